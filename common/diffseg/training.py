"""Training glue for MONAI's ``SupervisedTrainer``: the batch preparation of segmentation diffusion (plain or
recycling) and of its feed-forward twin, and gradient-norm clipping as an engine handler.

Wiring (see the bundles' ``train.json``)::

    SupervisedTrainer(network=denoiser, inferer=SimpleInferer(),
                      prepare_batch=DiffusionSegPrepareBatch(scheduler, codec, network=denoiser, recycling=True),
                      loss_function=DiffusionSegLoss(codec, scheduler), ...)

MONAI's ``SupervisedTrainer._iteration`` then calls ``denoiser(x_t, timesteps=t, image=image)`` and
``loss(pred, target)``; amp, gradient accumulation and events stay MONAI's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from monai.engines import DiffusionPrepareBatch
from monai.engines.utils import IterationEvents
from monai.utils import min_version, optional_import

from diffseg.codecs import MaskCodec
from diffseg.recycling import check_recycling_mode, recycled_x0
from diffseg.scheduler import DiffusionScheduler

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["DiffusionSegPrepareBatch", "FeedForwardPrepareBatch", "GradientClipping"]


class DiffusionSegPrepareBatch(DiffusionPrepareBatch):
    """Noises the *mask* (not the image) and passes the image as condition; optionally recycles (paper 000).

    For a batch ``{"image": (B, C_img, *S), "label": (B, 1, *S)}`` it returns
    ``(x_t, target, (), {"timesteps": t, "image": image})`` where ``target`` holds ``label`` (one-hot, 0/1),
    ``x0``, ``noise``, ``x_t`` and ``timesteps`` for :class:`diffseg.losses.DiffusionSegLoss`.

    Args:
        scheduler: the training chain (t ~ Uniform{0..T-1}).
        codec: label map ↔ x-space.
        network: the denoiser; required for recycling (its first pass runs here, without gradient).
        recycling: build x_t from the network's own stop-gradient prediction at t' instead of the ground truth.
        recycling_mode: ``"next"`` (t' = min(t+1, T-1), v0.1.0 / the paper) or ``"max"`` (t' = T-1, HEAD; t is then
            drawn from {0..T-2}).
        logits_output: the network outputs mask logits (x0-parameterisation through softmax).
        image_key, label_key: keys of the batch dictionary.
        final_step_fraction: probability that a sample's t is T-1 instead of a uniform draw (0 = the papers'
            uniform t). A single-step sampler (SDSeg) only ever calls t = T-1; a short budget can put part of the
            batch there.
    """

    def __init__(
        self,
        scheduler: DiffusionScheduler,
        codec: MaskCodec,
        network: nn.Module | None = None,
        recycling: bool = False,
        recycling_mode: str = "next",
        logits_output: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        final_step_fraction: float = 0.0,
    ) -> None:
        super().__init__(scheduler.num_train_timesteps, condition_name=image_key)
        if recycling and network is None:
            raise ValueError("recycling=True needs the network for its first (no-gradient) pass")
        if not 0.0 <= final_step_fraction <= 1.0:
            raise ValueError(f"final_step_fraction={final_step_fraction} must be in [0, 1]")
        check_recycling_mode(recycling_mode)
        self.scheduler, self.codec, self.network = scheduler, codec, network
        self.recycling, self.recycling_mode, self.logits_output = recycling, recycling_mode, logits_output
        self.image_key, self.label_key = image_key, label_key
        self.final_step_fraction = final_step_fraction

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        """t (B,) long: uniform on {0..T-1} ({0..T-2} for xT-recycling), T-1 with ``final_step_fraction``."""
        high = self.num_train_timesteps
        if self.recycling and self.recycling_mode == "max" and high > 1:
            high -= 1  # xT-recycling trains t in [0, T-1)
        t = torch.randint(0, high, (images.shape[0],), device=images.device).long()
        if self.final_step_fraction > 0:
            final = torch.rand(t.shape, device=t.device) < self.final_step_fraction
            t = torch.where(final, torch.full_like(t, self.num_train_timesteps - 1), t)
        return t

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        for key in (self.image_key, self.label_key):
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batchdata)})")
        image = batchdata[self.image_key].to(device, non_blocking=non_blocking, **kwargs)
        label = batchdata[self.label_key].to(device, non_blocking=non_blocking, **kwargs)
        return self.prepare(image, label)

    def prepare(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        """Training inputs of a batch on its device: image (B, C_img, *S), label (B, 1, *S) class indices →
        ``(x_t, target, (), {"timesteps": t, "image": image})``; subclasses change what the network is trained on."""
        x0 = self.codec.encode(label).to(image.dtype)
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        clean = x0
        if self.recycling:
            clean = recycled_x0(
                self.network, image, x0, timesteps, self.scheduler, self.codec, self.logits_output, self.recycling_mode
            )
        x_t = self.scheduler.add_noise(clean, noise, timesteps)
        target = {
            "label": self.codec.onehot(label).to(image.dtype),
            "x0": x0,
            "noise": noise,
            "x_t": x_t,
            "timesteps": timesteps,
        }
        return x_t, target, (), {"timesteps": timesteps, "image": image}


class FeedForwardPrepareBatch(DiffusionSegPrepareBatch):
    """The feed-forward twin of a diffusion bundle (analysis paper 001, experiment E1): the same network trained
    directly as a segmenter, called once on pure noise at t = T-1.

    Returns ``(noise, target, (), {"timesteps": T-1, "image": image})``: the network input is N(0, I) noise of x0's
    shape (B, C, *S) with no trace of the mask, and ``target["x_t"]`` is that noise, so the bundle's loss (e.g.
    :class:`diffseg.losses.DiffusionSegLoss` with ``logits_output=True``) trains on x0 directly. At inference a
    one-step ``prediction_type="sample"`` segmenter (``num_inference_steps=1`` from t = T-1) feeds exactly such noise
    and returns the network's prediction.

    Cooperative: it wraps the x0 of any :class:`DiffusionSegPrepareBatch` subclass that comes after it in the MRO
    (e.g. a latent one), whose arguments it takes; recycling must be off.

    Raises:
        ValueError: if constructed with ``recycling=True``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.recycling:
            raise ValueError("the feed-forward twin never sees x_t from a mask: construct it with recycling=False")

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) long, all T-1."""
        return torch.full((images.shape[0],), self.num_train_timesteps - 1, dtype=torch.long, device=images.device)

    def prepare(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        _, target, args, kw = super().prepare(image, label)
        target["x_t"] = target["noise"]  # the network never sees the mask
        return target["noise"], target, args, kw


class GradientClipping:
    """Clips the global gradient norm after every backward pass (``IterationEvents.BACKWARD_COMPLETED``), before
    the optimizer step. Attach like any MONAI handler (``train#handlers``).

    Args:
        max_norm: maximum L2 norm of all gradients (paper 000: 1.0).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm={max_norm} must be > 0")
        self.max_norm = max_norm
        self.last_norm: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
        self.last_norm = float(norm)
