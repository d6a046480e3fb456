"""Per-voxel uncertainty of a diffusion ensemble and per-image scores for active learning."""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffseg.codecs import EPS

__all__ = ["Uncertainty", "UNCERTAINTY_MEASURES", "image_score", "predictive_entropy", "sample_std", "uncertainty"]

UNCERTAINTY_MEASURES = ("std", "entropy")


class Uncertainty(NamedTuple):
    """Uncertainty maps of one call; ``std`` (B, C, *S) per class, ``entropy`` (B, 1, *S) in nats."""

    std: torch.Tensor
    entropy: torch.Tensor


def sample_std(samples: torch.Tensor) -> torch.Tensor:
    """Per-voxel, per-class standard deviation of probabilities across samples: (B, N, C, *S) → (B, C, *S).

    Population std (divides by N); exactly 0 where all samples agree. Computed from the deviations d from the first
    sample (shifted data: var = E[d²] − E[d]²), the same value as ``samples.std(dim=1, correction=0)`` to float32
    round-off and about 5× faster on the CPU: ``torch.std`` over a middle axis took 0.5 s for (1, N, 8, 160, 128, 32).
    """
    d = samples - samples[:, :1]
    return (d.square().mean(dim=1) - d.mean(dim=1).square()).clamp_min(0).sqrt()


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``-Σ_c p_c log p_c`` of (mean) probabilities (B, C, *S) → (B, 1, *S), in nats (max log C)."""
    return -(probs * torch.log(probs.clamp_min(EPS))).sum(dim=1, keepdim=True)


def uncertainty(samples: torch.Tensor) -> Uncertainty:
    """Both maps of an ensemble (B, N, C, *S): std across samples and entropy of the mean probabilities."""
    return Uncertainty(sample_std(samples), predictive_entropy(samples.mean(dim=1)))


def image_score(maps: Uncertainty, measure: str = "std") -> torch.Tensor:
    """One disagreement score per image (B,): mean over voxels of the class-averaged std, or of the entropy."""
    if measure == "std":
        return maps.std.mean(dim=1).flatten(1).mean(dim=1)
    if measure == "entropy":
        return maps.entropy.flatten(1).mean(dim=1)
    raise ValueError(f"measure={measure!r}; expected one of {list(UNCERTAINTY_MEASURES)}")
