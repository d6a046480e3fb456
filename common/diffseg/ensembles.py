"""Combining the samples of a diffusion ensemble into one per-class score map."""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot

__all__ = ["AGGREGATIONS", "aggregate", "majority_vote", "mean_probabilities"]

AGGREGATIONS = ("mean", "vote")


def mean_probabilities(samples: torch.Tensor) -> torch.Tensor:
    """Mean of the samples' class probabilities: (B, N, C, *S) → (B, C, *S) (SegDiff: mean, then threshold)."""
    return samples.mean(dim=1)


def majority_vote(samples: torch.Tensor) -> torch.Tensor:
    """Fraction of samples voting for each class: (B, N, C, *S) → (B, C, *S); its argmax is the majority vote of the
    per-sample argmax masks (ImgX ``run_test_ensemble``: sum of one-hots, then argmax; ties → lowest class)."""
    b, n, c = samples.shape[:3]
    votes = samples.reshape(b * n, c, *samples.shape[3:]).argmax(dim=1, keepdim=True)
    return one_hot(votes, c, dtype=samples.dtype, dim=1).reshape(samples.shape).mean(dim=1)


def aggregate(samples: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Per-class scores (B, C, *S) of N samples (B, N, C, *S) by ``"mean"`` probability or majority ``"vote"``."""
    if method == "mean":
        return mean_probabilities(samples)
    if method == "vote":
        return majority_vote(samples)
    raise ValueError(f"aggregation={method!r}; expected one of {list(AGGREGATIONS)}")
