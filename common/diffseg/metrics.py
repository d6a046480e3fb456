"""Evaluation and analysis metrics (papers 000–003 and the analysis paper 001), built on MONAI's metrics.

- overlap / distance: Dice and HD95 per class (MONAI ``DiceMetric``, ``HausdorffDistanceMetric``);
- calibration: ECE with 10 equal-width bins (MONAI ``CalibrationErrorMetric``) and reliability-diagram data;
- stability across seeds (SDSeg Table 5): pairwise Dice agreement and PSNR / SSIM of probability maps.
"""

from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import torch
from monai.metrics import (
    CalibrationErrorMetric,
    DiceMetric,
    HausdorffDistanceMetric,
    MeanIoU,
    PSNRMetric,
    SSIMMetric,
    calibration_binning,
)
from monai.networks.utils import one_hot

__all__ = [
    "CALIBRATION_MODES",
    "ReliabilityData",
    "StabilityResult",
    "classwise_calibration_error",
    "dice_per_class",
    "expected_calibration_error",
    "hd95_per_class",
    "iou_per_class",
    "reliability_data",
    "seed_stability",
]

CALIBRATION_MODES = ("foreground", "confidence")


def _onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return one_hot(labels.long(), num_classes, dim=1)


def dice_per_class(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, include_background: bool = False):
    """Dice per image and class: label maps (B, 1, *S) → (B, C') with NaN where the ground truth is empty."""
    metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=True)
    return metric(_onehot(pred, num_classes), _onehot(gt, num_classes))


def iou_per_class(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, include_background: bool = False):
    """IoU per image and class: label maps (B, 1, *S) → (B, C'), NaN where the ground truth is empty."""
    metric = MeanIoU(include_background=include_background, reduction="none", ignore_empty=True)
    return metric(_onehot(pred, num_classes), _onehot(gt, num_classes))


def hd95_per_class(
    pred: torch.Tensor,
    gt: torch.Tensor,
    num_classes: int,
    spacing: float | tuple[float, ...] | None = None,
    include_background: bool = False,
) -> torch.Tensor:
    """95th-percentile Hausdorff distance per image and class (in ``spacing`` units; voxels when None)."""
    metric = HausdorffDistanceMetric(include_background=include_background, percentile=95, reduction="none")
    return metric(_onehot(pred, num_classes), _onehot(gt, num_classes), spacing=spacing)


def _calibration_inputs(probs: torch.Tensor, gt: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, outcomes) of shape (B, 1, *S): foreground p vs y, or confidence max(p, 1-p) vs correctness."""
    if probs.shape[1] != 2:
        raise ValueError(f"calibration expects binary probabilities (B, 2, *S), got shape {tuple(probs.shape)}")
    p, y = probs[:, 1:2].float(), (gt > 0).float()
    if mode == "foreground":
        return p, y
    if mode == "confidence":
        return torch.maximum(p, 1 - p), ((p >= 0.5).float() == y).float()
    raise ValueError(f"mode={mode!r}; expected one of {list(CALIBRATION_MODES)}")


def expected_calibration_error(
    probs: torch.Tensor, gt: torch.Tensor, num_bins: int = 10, mode: str = "foreground"
) -> torch.Tensor:
    """Pixel-wise ECE per image (B,) with ``num_bins`` equal-width bins ((m-1)/M, m/M] (paper 001's definition).

    Args:
        probs: binary probabilities (B, 2, *S) (background, foreground), e.g. the mean of N diffusion samples.
        gt: label map (B, 1, *S), foreground = label > 0.
        mode: ``"foreground"`` (p vs y) or ``"confidence"`` (max(p, 1-p) vs whether p ≥ 0.5 is correct).
    """
    scores, outcomes = _calibration_inputs(probs, gt, mode)
    metric = CalibrationErrorMetric(num_bins=num_bins, metric_reduction="none", right=True)
    return metric(y_pred=scores, y=outcomes).reshape(-1)


def classwise_calibration_error(probs: torch.Tensor, gt: torch.Tensor, num_bins: int = 10) -> torch.Tensor:
    """ECE per image and foreground class for multiclass probabilities (B, C, *S) and a label map (B, 1, *S):
    each class's p_c against its one-hot indicator, ``num_bins`` right-closed bins → (B, C-1)."""
    onehot = _onehot(gt, probs.shape[1]).to(probs.dtype)
    metric = CalibrationErrorMetric(num_bins=num_bins, include_background=False, metric_reduction="none", right=True)
    return metric(y_pred=probs, y=onehot)


class ReliabilityData(NamedTuple):
    """Reliability-diagram data pooled over all voxels of a set: per bin (M,) mean score, observed frequency and
    count; bins with no voxels hold NaN. ``ece`` is the pooled ECE."""

    bin_edges: torch.Tensor  # (M+1,)
    confidence: torch.Tensor  # (M,)
    accuracy: torch.Tensor  # (M,)
    counts: torch.Tensor  # (M,)
    ece: float


def reliability_data(
    probs: torch.Tensor, gt: torch.Tensor, num_bins: int = 10, mode: str = "foreground"
) -> ReliabilityData:
    """Bin statistics over all voxels of ``probs`` (B, 2, *S) and ``gt`` (B, 1, *S), pooled across images."""
    scores, outcomes = _calibration_inputs(probs, gt, mode)
    flat_s, flat_o = scores.reshape(1, 1, -1), outcomes.reshape(1, 1, -1)
    conf, acc, counts = (v.reshape(-1) for v in calibration_binning(flat_s, flat_o, num_bins=num_bins, right=True))
    weights = counts / counts.sum().clamp_min(1)
    ece = float(torch.nansum(weights * (conf - acc).abs()))
    return ReliabilityData(torch.linspace(0, 1, num_bins + 1), conf, acc, counts, ece)


class StabilityResult(NamedTuple):
    """Agreement between repeated runs: means over all pairs of runs (SDSeg Table 5)."""

    dice: float
    psnr: float
    ssim: float
    pairs: int


def seed_stability(probs_runs: list[torch.Tensor], num_classes: int | None = None) -> StabilityResult:
    """Pairwise agreement of R ≥ 2 runs with different seeds, each probabilities (B, C, *S) in [0, 1].

    Dice compares the runs' argmax label maps over foreground classes (pairs where both are empty count as 1);
    PSNR (max 1) and SSIM (data range 1) compare the foreground probability maps channel 1.. .
    """
    if len(probs_runs) < 2:
        raise ValueError(f"stability needs at least 2 runs, got {len(probs_runs)}")
    c = num_classes or probs_runs[0].shape[1]
    spatial_dims = probs_runs[0].ndim - 2
    dice_m = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    psnr_m = PSNRMetric(max_val=1.0, reduction="mean")
    ssim_m = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, reduction="mean", win_size=5)
    dices, psnrs, ssims = [], [], []
    for a, b in combinations(probs_runs, 2):
        la, lb = a.argmax(1, keepdim=True), b.argmax(1, keepdim=True)
        dices.append(float(dice_m(_onehot(la, c), _onehot(lb, c)).nanmean()))
        fa, fb = a[:, 1:].float(), b[:, 1:].float()
        psnrs.append(float(psnr_m(fa, fb).mean()))
        ssims.append(float(ssim_m(fa, fb).mean()))
    n = len(dices)
    return StabilityResult(sum(dices) / n, sum(psnrs) / n, sum(ssims) / n, n)
