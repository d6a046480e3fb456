"""Segmentation-diffusion losses: foreground Dice that ignores absent classes, CE, and the ε/x0 MSE term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from diffseg.codecs import EPS, MaskCodec
from diffseg.scheduler import DiffusionScheduler, PredictionType

__all__ = ["DiffusionSegLoss", "ForegroundDiceLoss", "cross_entropy_from_probs"]


class ForegroundDiceLoss(DiceLoss):
    """ImgX-DiffSeg's Dice loss: ``1 - 2Σ(p·y)/Σ(p+y)`` per sample and foreground class (no smoothing), averaged
    over the (sample, class) pairs whose ground truth is non-empty; absent classes are ignored, not rewarded.

    Input: probabilities and one-hot targets (B, C, *S), C including background (channel 0, always excluded).
    Returns 0 (with a graph) when no foreground class is present in the batch.
    """

    def __init__(self, smooth_dr: float = 1e-7) -> None:
        # smooth_dr only guards 0/0 on empty predictions of absent classes; present classes have Σy ≥ 1
        super().__init__(include_background=False, reduction="none", smooth_nr=0.0, smooth_dr=smooth_dr)

    def forward(  # noqa: A002 (MONAI's name)
        self, input: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``weights`` (B,): per-sample factors on the (sample, class) terms before the mean over present pairs."""
        per_class = super().forward(input, target).flatten(2).mean(-1)  # (B, C-1)
        present = target[:, 1:].flatten(2).sum(-1) > 0  # (B, C-1)
        if not bool(present.any()):
            return per_class.sum() * 0.0
        if weights is not None:
            per_class = per_class * weights[:, None]
        return per_class[present].mean()


def cross_entropy_from_probs(
    probs: torch.Tensor, onehot: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over voxels of ``-log p_y``; probabilities and one-hot targets (B, C, *S). Equals ``F.cross_entropy``
    on logits whose softmax is ``probs`` (up to the EPS floor). ``weights`` (B,): per-sample factors."""
    per_sample = F.nll_loss(torch.log(probs.clamp_min(EPS)), onehot.argmax(dim=1), reduction="none").flatten(1).mean(1)
    return (per_sample if weights is None else per_sample * weights).mean()


class DiffusionSegLoss(nn.Module):
    """Loss of a segmentation denoiser: ``dice·Dice_fg + ce·CE + mse·MSE``.

    The prediction is turned into class probabilities either directly (``logits_output=True``: the network outputs
    mask logits, x0-parameterisation of paper 000) or through the scheduler's parameterisation (ε̂ → x̂0 →
    ``codec.decode``, the ε-mode of paper 000). The MSE term compares the raw output with its regression target
    (ε for ε-prediction, x0 for x0-prediction, v for v-prediction).

    Args:
        codec: the mask codec used to build x0.
        scheduler: needed unless ``logits_output`` (for x̂0 and the MSE target).
        logits_output: the network outputs mask logits.
        dice_weight, ce_weight, mse_weight: term weights (paper 000: 1, 1, and 0.1 for ε-prediction only).
        mse_reduction: ``"mean"`` over all elements, or ``"sum"`` per sample then mean over the batch (SegDiff's
            ``terms["sum"]``).
        x0_snr_gamma: Min-SNR-γ weighting (Hang et al. 2023) of the Dice and CE terms of an ε/v-predictor: each
            sample's x̂0 terms are scaled by min(SNR_t, γ)/γ, SNR_t = ᾱ_t/(1 − ᾱ_t). Where SNR is low, x̂0 =
            (x_t − √(1−ᾱ)·ε̂)/√ᾱ amplifies every error of ε̂ and its Dice/CE reward an ε̂ that ignores x_t; null = off.

    ``forward(pred, target)``: ``pred`` (B, C_out, *S); ``target`` the mapping made by
    :class:`diffseg.training.DiffusionSegPrepareBatch` with ``label`` (one-hot), ``x0``, ``noise``, ``x_t`` and
    ``timesteps``.
    """

    def __init__(
        self,
        codec: MaskCodec,
        scheduler: DiffusionScheduler | None = None,
        logits_output: bool = True,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        mse_weight: float = 0.0,
        mse_reduction: str = "mean",
        x0_snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        if x0_snr_gamma is not None and (logits_output or x0_snr_gamma <= 0):
            raise ValueError(f"x0_snr_gamma={x0_snr_gamma} needs a positive γ and an ε/v-predictor (not logits_output)")
        self.x0_snr_gamma = x0_snr_gamma
        if scheduler is None and not logits_output:
            raise ValueError("a scheduler is required when the network does not output mask logits")
        if mse_weight and logits_output:
            raise ValueError("mse_weight applies to ε/x0/v regression outputs, not to mask logits (logits_output)")
        if mse_reduction not in ("mean", "sum"):
            raise ValueError(f"mse_reduction={mse_reduction!r}; expected one of ['mean', 'sum']")
        self.codec, self.scheduler, self.logits_output = codec, scheduler, logits_output
        self.dice_weight, self.ce_weight, self.mse_weight = dice_weight, ce_weight, mse_weight
        self.mse_reduction = mse_reduction
        self.dice = ForegroundDiceLoss()
        self.last_terms: dict[str, float] = {}

    def probabilities(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class probabilities (B, C, *S) implied by the network output."""
        if self.logits_output:
            return self.codec.logits_to_probs(pred)
        x0 = self.scheduler.predict_x0(pred, target["timesteps"], target["x_t"])
        return self.codec.decode(x0)

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) Min-SNR-γ factors min(SNR_t, γ)/γ of the x̂0 terms."""
        acp = self.scheduler.alphas_cumprod64.to(timesteps.device)[timesteps]
        return (acp / (1 - acp)).clamp(max=self.x0_snr_gamma) / self.x0_snr_gamma

    def regression_target(self, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.scheduler.prediction_type == PredictionType.EPSILON:
            return target["noise"]
        if self.scheduler.prediction_type == PredictionType.SAMPLE:
            return target["x0"]
        return self.scheduler.get_velocity(target["x0"], target["noise"], target["timesteps"])

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the terms; their unweighted values are kept in ``last_terms`` (learning curves)."""
        terms: dict[str, torch.Tensor] = {}
        if self.dice_weight or self.ce_weight:
            probs = self.probabilities(pred, target)
            weights = self.snr_weights(target["timesteps"]).to(probs) if self.x0_snr_gamma else None
            if self.dice_weight:
                terms["dice"] = self.dice(probs, target["label"], weights)
            if self.ce_weight:
                terms["ce"] = cross_entropy_from_probs(probs, target["label"], weights)
        if self.mse_weight:
            sq = (pred - self.regression_target(target)) ** 2
            terms["mse"] = sq.mean() if self.mse_reduction == "mean" else sq.flatten(1).sum(1).mean()
        weights = {"dice": self.dice_weight, "ce": self.ce_weight, "mse": self.mse_weight}
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum((weights[k] * v for k, v in terms.items()), pred.new_zeros(()))
