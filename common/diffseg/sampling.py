"""The reverse-process loop over any denoiser and any diffseg sampler, as a generator of per-step results."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from diffseg.denoiser import ConditionalDenoiser
from diffseg.scheduler import DiffusionScheduler, StepOutput

__all__ = ["sample", "sample_progressive"]


def sample_progressive(
    denoiser: ConditionalDenoiser,
    features: Any,
    scheduler: DiffusionScheduler,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    output_to_sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, StepOutput]]:
    """Run the reverse chain over ``scheduler.timesteps`` and yield ``(t, StepOutput)`` after every step.

    Args:
        denoiser: called as ``denoiser.denoise(x_t, timesteps (B,), features)``.
        features: the image conditioning, computed once (``denoiser.encode_condition``), batch aligned with noise.
        scheduler: a diffseg sampler whose ``set_timesteps`` was called.
        noise: x_T (B, C, *S).
        generator: source of the step noise.
        output_to_sample: maps the raw output before the step (e.g. mask logits → ``softmax·2-1``).
        progress: show a tqdm bar over steps.
    """
    x = noise
    for t in tqdm(scheduler.timesteps.tolist(), desc="diffusion steps", leave=False, disable=not progress):
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = denoiser.denoise(x, timesteps, features)
        if output_to_sample is not None:
            out = output_to_sample(out)
        step = scheduler.step(out, t, x, generator=generator)
        x = step.prev_sample
        yield t, step


def sample(*args, **kwargs) -> torch.Tensor:
    """x̂0 of the last step of :func:`sample_progressive` (same arguments), shape of the noise."""
    last = deque(sample_progressive(*args, **kwargs), maxlen=1)  # keeps only the last step's tensors
    if not last:
        raise ValueError("the scheduler has no timesteps; call set_timesteps with at least 1 step")
    return last[0][1].pred_original_sample
