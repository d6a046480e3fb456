"""Respacing a noise schedule by ᾱ-subsampling (ImgX-DiffSeg v0.1.0 / improved-diffusion ``space_timesteps``).

A schedule of ``T`` betas is reduced to ``K`` steps by keeping ᾱ at ``K`` evenly spaced indices and rebuilding the
betas from consecutive ratios, so the reduced chain's ᾱ equals the base chain's ᾱ at the kept indices exactly.
The same reduced schedule serves training (ImgX trains on 5 steps) and sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffseg.schedules import alphas_cumprod

__all__ = ["respace", "spaced_timesteps"]


def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """Ascending indices kept when ``num_train_timesteps`` steps are reduced to ``num_steps``.

    The indices are ``floor(linspace(0, T-1, K) + 0.5)``: both ends are kept, and for ``(T-1) % (K-1) == 0`` they are
    the exact stride ``0, s, 2s, …, T-1`` of ImgX (T=1001, K=5: 0, 250, 500, 750, 1000). ``K == 1`` keeps only
    ``T-1`` (a single reverse step from pure noise, as SDSeg samples).

    Returns:
        long tensor of shape ``(K,)``, strictly increasing.

    Raises:
        ValueError: if ``num_steps`` is not in ``[1, num_train_timesteps]``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must be between 1 and num_train_timesteps={num_train_timesteps} "
            "(a schedule can only be respaced to fewer steps)"
        )
    if num_steps == 1:
        return torch.tensor([num_train_timesteps - 1], dtype=torch.long)
    # floor(x + 0.5), not torch.round: round-half-to-even could map two points 1 apart to the same index
    grid = torch.linspace(0, num_train_timesteps - 1, num_steps, dtype=torch.float64)
    return torch.floor(grid + 0.5).long()


def respace(betas: torch.Tensor, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Betas of the chain that visits only ``timesteps`` of the chain ``betas``.

    Args:
        betas: base schedule, shape ``(T,)``.
        timesteps: strictly increasing indices into the base chain, shape ``(K,)``.

    Returns:
        float64 betas of shape ``(K,)`` with ``β'_0 = 1 - ᾱ[τ_0]`` and ``β'_k = 1 - ᾱ[τ_k] / ᾱ[τ_{k-1}]``,
        so that ``cumprod(1 - β') == ᾱ[τ]``.

    Raises:
        ValueError: for indices that are out of range or not strictly increasing.
    """
    idx = torch.as_tensor(timesteps, dtype=torch.long)
    if idx.ndim != 1 or idx.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(idx.shape)}")
    if idx.min() < 0 or idx.max() >= betas.numel():
        raise ValueError(f"timesteps must lie in [0, {betas.numel() - 1}], got {idx.tolist()}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"timesteps must be strictly increasing, got {idx.tolist()}")
    acp = alphas_cumprod(betas)[idx]
    prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return 1.0 - acp / prev
