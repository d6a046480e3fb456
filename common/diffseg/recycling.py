"""Recycling (paper 000, Fu et al., Fig. 2; ImgX-DiffSeg v0.1.0 "xt-recycling").

Training normally noises the ground truth; at inference the network only ever sees its own predictions noised.
Recycling closes that gap: a first pass, without gradient, predicts the mask from the ground truth noised at a
later step t', and the training pass sees *that prediction* noised at t. Only the second pass is trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffseg.codecs import MaskCodec
from diffseg.scheduler import DiffusionScheduler

__all__ = ["RECYCLING_MODES", "check_recycling_mode", "output_to_x0", "recycled_x0", "recycling_timesteps"]

RECYCLING_MODES = ("next", "max")  # v0.1.0: t' = min(t+1, T-1); HEAD ("xT-recycling"): t' = T-1


def check_recycling_mode(mode: str) -> str:
    """``mode`` if it is one of ``RECYCLING_MODES``, else a ValueError naming the choices."""
    if mode not in RECYCLING_MODES:
        raise ValueError(f"recycling mode={mode!r}; expected one of {list(RECYCLING_MODES)}")
    return mode


def recycling_timesteps(timesteps: torch.Tensor, num_train_timesteps: int, mode: str = "next") -> torch.Tensor:
    """t' of the first pass for each sample's t (B,): ``min(t+1, T-1)`` (``"next"``) or ``T-1`` (``"max"``)."""
    if check_recycling_mode(mode) == "next":
        return torch.clamp(timesteps + 1, max=num_train_timesteps - 1)
    return torch.full_like(timesteps, num_train_timesteps - 1)


def output_to_x0(
    output: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DiffusionScheduler,
    codec: MaskCodec,
    logits_output: bool,
) -> torch.Tensor:
    """Network output at x_t → a valid mask estimate x̂0 in [-1, 1]: ``softmax(logits)·2-1`` for mask logits, else the
    scheduler's x̂0 projected by the codec (ImgX ε-mode: clip, renormalise)."""
    if logits_output:
        return codec.logits_to_x(output)
    return codec.project(scheduler.predict_x0(output, timesteps, x_t))


def recycled_x0(
    network: nn.Module,
    image: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DiffusionScheduler,
    codec: MaskCodec,
    logits_output: bool = True,
    mode: str = "next",
) -> torch.Tensor:
    """First recycling pass: predict x̂0 from the ground truth noised at t', with no gradient (stop-gradient).

    Args:
        network: the denoiser, called as ``network(x_t, timesteps, image)``.
        image: conditioning image (B, C_img, *S).
        x0: ground-truth mask in x-space (B, C, *S).
        timesteps: training timesteps t (B,) of the second pass.

    Returns:
        detached x̂0 (B, C, *S) to be noised at t for the trained pass.
    """
    t_prime = recycling_timesteps(timesteps, scheduler.num_train_timesteps, mode)
    with torch.no_grad():
        x_prime = scheduler.add_noise(x0, torch.randn_like(x0), t_prime)
        out = network(x_prime, t_prime, image)
        return output_to_x0(out, x_prime, t_prime, scheduler, codec, logits_output).detach()
