"""SDSeg training glue for MONAI's ``SupervisedTrainer``: the latent batch preparation, the latent-estimation loss,
the mask-autoencoder loss and its reconstruction inferer.

Latent diffusion (``train.json``)::

    SupervisedTrainer(network=SDSegDenoiser, inferer=SimpleInferer(),
                      prepare_batch=LatentPrepareBatch(scheduler, codec, latent),
                      loss_function=LatentEstimationLoss(scheduler))

The trainer calls ``denoiser(z_t, timesteps=t, image=image)`` (the vision encoder trains with the U-Net) and
``loss(eps_hat, target)``. The feed-forward twin (``train_feedforward.json``) swaps in
:class:`LatentFeedForwardPrepareBatch` and ``prediction_type="sample"``: ``loss(z0_hat, target)`` on z_T noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from diffseg import BinaryCodec, DiffusionScheduler, DiffusionSegPrepareBatch, FeedForwardPrepareBatch, MaskCodec
from monai.losses import DiceLoss

from .network import LatentAutoencoder

__all__ = [
    "LatentEstimationLoss",
    "LatentFeedForwardPrepareBatch",
    "LatentPrepareBatch",
    "MaskAutoencoderLoss",
    "MaskReconstructor",
    "prepare_mask_batch",
]


class LatentPrepareBatch(DiffusionSegPrepareBatch):
    """Noises the *latent* of the mask: z0 = scale · E(mask·2-1 repeated to 3 channels), z_t = √ᾱ z0 + √(1-ᾱ) ε.

    Returns ``(z_t, target, (), {"timesteps": t, "image": image})`` with ``target`` = {``x0``: z0, ``noise``,
    ``x_t``, ``timesteps``}. On the first call with ``scale_by_std`` the latent scale is set to 1/std of that batch's
    latents (LDM ``scale_by_std``) and kept in ``latent.scale_factor`` (saved with the checkpoint).

    Args:
        scheduler: the training chain (t ~ Uniform{0..T-1}).
        codec: ``BinaryCodec(3)``: label → {-1, +1}³.
        latent: the frozen first stage.
        scale_by_std: compute the scale on the first batch (False: keep the loaded one).
        final_step_fraction: share of t = T-1 draws (:class:`diffseg.DiffusionSegPrepareBatch`; 0 = the paper).
    """

    def __init__(
        self,
        scheduler: DiffusionScheduler,
        codec: MaskCodec,
        latent: LatentAutoencoder,
        scale_by_std: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        final_step_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            scheduler,
            codec,
            logits_output=False,
            image_key=image_key,
            label_key=label_key,
            final_step_fraction=final_step_fraction,
        )
        self.latent = latent
        self.scale_pending = scale_by_std

    def prepare(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        self.latent.eval()  # frozen first stage
        raw = self.latent.raw_latent(self.codec.encode(label).to(image.dtype))
        if self.scale_pending:
            self.latent.set_scale_by_std(raw)
            self.scale_pending = False
        z0 = raw * self.latent.scale_factor
        noise = self.get_noise(z0)
        timesteps = self.get_timesteps(z0)
        z_t = self.scheduler.add_noise(z0, noise, timesteps)
        target = {"x0": z0, "noise": noise, "x_t": z_t, "timesteps": timesteps}
        return z_t, target, (), {"timesteps": timesteps, "image": image}


class LatentFeedForwardPrepareBatch(FeedForwardPrepareBatch, LatentPrepareBatch):
    """The feed-forward twin's batches (paper 001, E1): :class:`LatentPrepareBatch`'s z0 target with the network
    input z_T = pure noise of the latent's shape (B, 4, h, w) at t = T-1 (:class:`diffseg.FeedForwardPrepareBatch`).
    Same arguments as :class:`LatentPrepareBatch`."""


class LatentEstimationLoss(nn.Module):
    """SDSeg loss: ``L1(ε̂, ε) + seg_weight · L1(ẑ0, z0)`` with ẑ0 = (z_t - √(1-ᾱ_t) ε̂)/√ᾱ_t (latent estimation).

    With ``prediction_type="v_prediction"`` the network outputs v̂ and the loss is the same, with ε̂ and ẑ0 derived from
    v̂ (ẑ0 = √ᾱ_t z_t - √(1-ᾱ_t) v̂): at t = 999, where ε̂ would carry ẑ0's error times 1/√ᾱ = 38.7, v̂ ≈ -ẑ0 is
    well conditioned. With ``prediction_type="sample"`` (the feed-forward twin) the network output is ẑ0 and the simple
    term compares it with z0, as LDM's x0-parameterisation does, so the loss is ``(1 + seg_weight) · L1(ẑ0, z0)``.

    Args:
        scheduler: gives ᾱ_t and the parameterisation (``"epsilon"``, ``"v_prediction"`` or ``"sample"``).
        seg_weight: λ of the latent-estimation term (paper: 1).
    """

    def __init__(self, scheduler: DiffusionScheduler, seg_weight: float = 1.0) -> None:
        super().__init__()
        if scheduler.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"SDSeg's loss needs epsilon, v or sample prediction, got {scheduler.prediction_type!r}")
        self.scheduler, self.seg_weight = scheduler, seg_weight
        self.simple_key = "x0" if scheduler.prediction_type == "sample" else "noise"
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """pred ε̂, v̂ or ẑ0 (B, 4, h, w); target from :class:`LatentPrepareBatch` → scalar loss."""
        t, z_t = target["timesteps"], target["x_t"]
        z0_hat = self.scheduler.predict_x0(pred, t, z_t)
        simple_pred = (
            self.scheduler.predict_epsilon(z0_hat, t, z_t) if self.scheduler.prediction_type == "v_prediction" else pred
        )
        simple = (simple_pred - target[self.simple_key]).abs().mean()
        seg = (z0_hat - target["x0"]).abs().mean()
        self.last_terms = {"simple": float(simple.detach()), "seg": float(seg.detach())}
        return simple + self.seg_weight * seg


class MaskAutoencoderLoss(nn.Module):
    """Autoencoder loss on masks: ``L1(x̂, x) + kl_weight · KL(q(z|x) ‖ N(0, I)) + dice_weight · Dice(p̂, p)`` (the LDM
    kl-f8 loss without its LPIPS and GAN terms, which masks do not need). p̂ = ``clamp((x̂ + 1) / 2, 0, 1)`` averaged
    over the channels (what :class:`diffseg.BinaryCodec` decodes), p the mask; the batch Dice term (default off) puts
    the weight on the organ borders, where L1 over the whole slice is small.

    ``pred`` is ``AutoencoderKL.forward``'s ``(reconstruction, z_mu, z_sigma)``; ``target`` the input x (B, 3, H, W).
    """

    def __init__(self, kl_weight: float = 1e-6, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.kl_weight, self.dice_weight = kl_weight, dice_weight
        self.dice = DiceLoss(batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, pred: tuple[torch.Tensor, torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        recon, mu, sigma = pred
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
        loss = (recon - target).abs().mean() + self.kl_weight * kl.sum(dim=tuple(range(1, kl.ndim))).mean()
        if self.dice_weight:
            codec = BinaryCodec(recon.shape[1])
            loss = loss + self.dice_weight * self.dice(codec.decode(recon)[:, 1:], codec.decode(target)[:, 1:])
        return loss


class MaskReconstructor(nn.Module):
    """Evaluation view of the autoencoder: x (B, 3, H, W) → reconstruction (posterior mean, no sampling)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.reconstruct(x)


def prepare_mask_batch(
    batchdata: Mapping[str, torch.Tensor],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoencoder batches: the mask in x-space (``batch["label"]``, (B, 3, H, W)) is both input and target."""
    x = batchdata["label"].to(device, non_blocking=non_blocking, **kwargs)
    return x, x
