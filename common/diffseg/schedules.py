"""Noise schedules of the four methods, registered in MONAI's ``NoiseSchedules`` store.

Every function takes ``num_train_timesteps`` first and returns ``betas`` of shape ``(T,)`` in float64, so any MONAI
scheduler (``DDPMScheduler(schedule="improved_linear_beta")``) or a diffseg sampler can use them by name. MONAI's own
``linear_beta`` and ``scaled_linear_beta`` compute in float32; the float64 variants here reproduce the authors'
numbers (e.g. ImgX's ᾱ after 1001 steps) to the printed precision.
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import NoiseSchedules

__all__ = [
    "NoiseSchedules",
    "alphas_cumprod",
    "cosine_clipped_beta",
    "improved_linear_beta",
    "linear_beta_f64",
    "make_betas",
    "respaced_beta",
    "scaled_linear_beta_f64",
]


@NoiseSchedules.add_def("linear_beta_f64", "DDPM linear beta schedule in float64 (Ho et al.; ImgX-DiffSeg)")
def linear_beta_f64(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """``linspace(beta_start, beta_end, T)``, shape ``(T,)``; 1e-4 → 0.02 as in DDPM."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


@NoiseSchedules.add_def("improved_linear_beta", "improved-diffusion linear schedule scaled by 1000/T (SegDiff)")
def improved_linear_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """``linspace(beta_start·1000/T, beta_end·1000/T, T)``, shape ``(T,)``; T=100 gives 0.001 → 0.2."""
    scale = 1000.0 / num_train_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_train_timesteps, dtype=torch.float64)


@NoiseSchedules.add_def("scaled_linear_beta_f64", "LDM scaled-linear schedule in float64 (SDSeg: 0.0015 → 0.0155)")
def scaled_linear_beta_f64(
    num_train_timesteps: int, beta_start: float = 0.0015, beta_end: float = 0.0155
) -> torch.Tensor:
    """``linspace(√beta_start, √beta_end, T)²``, shape ``(T,)``; the latent-diffusion default."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


@NoiseSchedules.add_def("cosine_clipped_beta", "Nichol & Dhariwal cosine schedule, betas clipped to [1e-4, 0.9999]")
def cosine_clipped_beta(
    num_train_timesteps: int, s: float = 8e-3, beta_min: float = 1e-4, beta_max: float = 0.9999
) -> torch.Tensor:
    """Cosine schedule (arXiv 2102.09672 eq. 17): ᾱ(t) = cos²(((t/T)+s)/(1+s)·π/2) / ᾱ(0), shape ``(T,)``.

    Betas are ``1 - ᾱ(t+1)/ᾱ(t)`` clipped to ``[beta_min, beta_max]`` as in the diffusion-pretraining code (paper 004).
    """
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    acp = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    acp = acp / acp[0]
    return torch.clip(1.0 - acp[1:] / acp[:-1], beta_min, beta_max)


@NoiseSchedules.add_def("respaced_beta", "A base schedule respaced by ᾱ-subsampling (ImgX-DiffSeg, improved-diffusion)")
def respaced_beta(
    num_train_timesteps: int, base_schedule: str = "linear_beta_f64", base_timesteps: int = 1001, **base_args
) -> torch.Tensor:
    """Betas of ``num_train_timesteps`` steps whose ᾱ equal a ``base_timesteps``-step base schedule's ᾱ at evenly
    spaced indices (see :func:`diffseg.respacing.respace`). ImgX-DiffSeg v0.1.0 trains and samples on
    ``respaced_beta(5)`` of a 1001-step linear schedule: ᾱ = [0.9999, 0.52175, 0.077992, 0.0033189, 3.995e-5].
    """
    from diffseg.respacing import respace, spaced_timesteps  # respacing imports this module's helpers

    base = make_betas(base_schedule, base_timesteps, **base_args)
    return respace(base, spaced_timesteps(base_timesteps, num_train_timesteps))


def make_betas(schedule: str, num_train_timesteps: int, **schedule_args) -> torch.Tensor:
    """Betas of any registered schedule (MONAI's or diffseg's) as a float64 ``(T,)`` tensor.

    Raises:
        ValueError: for an unknown schedule name (the message lists the registered ones).
    """
    if schedule not in NoiseSchedules.names:
        raise ValueError(f"schedule={schedule!r}; expected one of {sorted(NoiseSchedules.names)}")
    out = NoiseSchedules[schedule](num_train_timesteps, **schedule_args)
    betas = out[0] if isinstance(out, tuple) else out
    return betas.to(torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ = cumprod(1 - β), shape ``(T,)``, float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
