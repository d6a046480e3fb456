"""The segmenter contract: ``forward(image) -> per-class scores`` with the whole sampler inside.

Because the network itself maps an image to class scores, MONAI's ``SlidingWindowInferer``,
``python -m monai.bundle verify_net_in_out``, MONAI Label and MONAI Deploy use a bundle's ``network_def`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from monai.utils import convert_to_tensor

from diffseg.codecs import MaskCodec
from diffseg.denoiser import ConditionalDenoiser
from diffseg.ensembles import AGGREGATIONS, aggregate
from diffseg.sampling import sample
from diffseg.scheduler import DiffusionScheduler, PredictionType
from diffseg.uncertainty import Uncertainty, uncertainty

__all__ = ["DiffusionSegmenter", "SegmenterOutput", "map_tensors", "repeat_batch"]


class SegmenterOutput(NamedTuple):
    probs: torch.Tensor  # (B, C, *S) per-class scores (mean probability or vote fraction)
    uncertainty: Uncertainty  # std (B, C, *S), entropy (B, 1, *S)
    samples: torch.Tensor  # (B, N, C, *S) per-sample probabilities


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple/list/dict structure; other leaves are kept."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def repeat_batch(obj: Any, n: int) -> Any:
    """Repeat every tensor in a (nested) structure ``n`` times along the batch: (B, …) → (B·n, …), b-major."""
    return map_tensors(obj, lambda t: t.repeat_interleave(n, dim=0))


class DiffusionSegmenter(nn.Module):
    """Image → per-class scores by running a diffusion sampler (an ensemble of ``num_samples`` chains, batched).

    Args:
        denoiser: a :class:`diffseg.denoiser.ConditionalDenoiser`; ``encode_condition`` runs once per image.
        scheduler: a diffseg sampler (``DDPMSampler``/``DDIMSampler``) built with the training chain.
        codec: mask codec; decodes x̂0 to probabilities.
        num_inference_steps: reverse steps (None: the full training chain; 1: single step from t = T-1).
        num_samples: ensemble size N; the N chains run as one batch (B·N).
        aggregation: ``"mean"`` probability or majority ``"vote"``.
        seed: same seed → identical output; None draws from the global RNG.
        logits_output: the denoiser outputs mask logits (x0 = softmax·2-1, paper 000); needs a
            ``prediction_type="sample"`` scheduler.
        sample_channels: channels of x_t (default ``codec.channels``; latent channels for latent diffusion).
        latent_decoder: maps the final latent x̂0 to mask space (latent diffusion, SDSeg); None for pixel space.
        latent_downsample: spatial factor between image and x_t (8 for a kl-f8 autoencoder).
        samples_per_batch: cap on chains run at once (memory); None runs all B·N together.
        progress: tqdm bar over steps.

    ``forward`` returns the scores; the last call's uncertainty is in ``last_uncertainty`` (not part of ``pred``) and
    its per-sample probabilities (B, N, C, *S) in ``last_samples`` (ensemble analyses: any N' ≤ N from one run).
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        scheduler: DiffusionScheduler,
        codec: MaskCodec,
        num_inference_steps: int | None = None,
        num_samples: int = 1,
        aggregation: str = "mean",
        seed: int | None = 0,
        logits_output: bool = False,
        sample_channels: int | None = None,
        latent_decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        latent_downsample: int = 1,
        samples_per_batch: int | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r}; expected one of {list(AGGREGATIONS)}")
        if logits_output and scheduler.prediction_type != PredictionType.SAMPLE:
            raise ValueError(
                "logits_output=True means the denoiser predicts x0 (as mask logits): the scheduler needs "
                f"prediction_type='sample', got {scheduler.prediction_type!r}"
            )
        if samples_per_batch is not None and samples_per_batch < 1:
            raise ValueError(f"samples_per_batch={samples_per_batch} must be >= 1 or None")
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.codec = codec
        self.num_inference_steps = num_inference_steps
        self.num_samples = num_samples
        self.aggregation = aggregation
        self.seed = seed
        self.logits_output = logits_output
        self.sample_channels = sample_channels or codec.channels
        self.latent_decoder = latent_decoder
        self.latent_downsample = latent_downsample
        self.samples_per_batch = samples_per_batch
        self.progress = progress
        self.last_uncertainty: Uncertainty | None = None
        self.last_samples: torch.Tensor | None = None

    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        image = convert_to_tensor(image, track_meta=False)
        if image.ndim < 3:
            raise ValueError(f"image must be (B, C, *spatial), got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values; fix or mask them before segmentation")
        bad = [s for s in image.shape[2:] if s % self.latent_downsample]
        if bad:
            factor = self.latent_downsample
            raise ValueError(f"spatial shape {tuple(image.shape[2:])} must be divisible by latent_downsample={factor}")
        return image

    def predict(self, image: torch.Tensor, denoiser: ConditionalDenoiser | None = None) -> SegmenterOutput:
        """Scores, uncertainty and per-sample probabilities for ``image`` (B, C_img, *S).

        ``denoiser`` replaces ``self.denoiser`` for this call (e.g. :class:`diffseg.sliding.WindowedDenoiser`, which
        evaluates the same network window by window).
        """
        image = self._check_image(image)
        b, n = image.shape[0], self.num_samples
        denoiser = self.denoiser if denoiser is None else denoiser
        features = repeat_batch(denoiser.encode_condition(image), n)  # once per image, shared by N and steps
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(int(self.seed))
        spatial = [s // self.latent_downsample for s in image.shape[2:]]
        noise = torch.randn(
            (b * n, self.sample_channels, *spatial), generator=generator, device=image.device, dtype=image.dtype
        )
        self.scheduler.set_timesteps(self.num_inference_steps or self.scheduler.num_train_timesteps)
        to_sample = self.codec.logits_to_x if self.logits_output else None
        chunk = self.samples_per_batch or b * n
        x0 = torch.cat(
            [
                sample(
                    denoiser,
                    map_tensors(features, lambda t, i=i: t[i : i + chunk]),
                    self.scheduler,
                    noise[i : i + chunk],
                    generator=generator,
                    output_to_sample=to_sample,
                    progress=self.progress,
                )
                for i in range(0, b * n, chunk)
            ]
        )
        if self.latent_decoder is not None:
            x0 = self.latent_decoder(x0)
        probs = self.codec.decode(x0)
        samples = probs.reshape(b, n, *probs.shape[1:])
        return SegmenterOutput(aggregate(samples, self.aggregation), uncertainty(samples), samples)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, C_img, *S) → per-class scores (B, C, *S); stores ``last_uncertainty``."""
        out = self.predict(image)
        self.last_uncertainty, self.last_samples = out.uncertainty, out.samples
        return out.probs
