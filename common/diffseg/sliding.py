"""Window-consistent sampling: one reverse chain for a whole image, evaluated window by window.

MONAI's ``SlidingWindowInferer`` around a :class:`~diffseg.segmenter.DiffusionSegmenter` runs a *separate* chain in
every window (as Diff-UNet does): overlapping windows start from different noise and disagree where they meet.
:class:`WindowConsistentInferer` instead keeps one x_t for the whole image. At every reverse step each window's
denoiser output is computed, the outputs are blended with MONAI's ``sliding_window_inference`` (gaussian weights by
default), and one scheduler step updates x_t everywhere, so windows can never disagree. For a network whose output at a
voxel depends only on that voxel, the result equals the same sampler run on the whole image at once.

Raw denoiser outputs are blended (mask logits for x0-prediction, ε for ε-prediction), as MONAI bundles blend logits
before the softmax. The image conditioning (``encode_condition``) of each window is computed once per image and
reused for all steps; the N ensemble members of a window run as one batch.

An image smaller than the window along an axis (a thin volume) gets a window shrunk to the image rounded up to the
network's divisibility (:func:`fit_window`), and the remainder is padded by edge replication, not zeros
(:func:`pad_spatial`; MONAI's ``padding_mode="replicate"`` inside the window loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer, sliding_window_inference
from monai.transforms import SpatialPad
from monai.utils import BlendMode, PytorchPadMode, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from diffseg.denoiser import ConditionalDenoiser
from diffseg.segmenter import DiffusionSegmenter, repeat_batch
from diffseg.uncertainty import Uncertainty

__all__ = ["StitchedUncertaintyInferer", "WindowConsistentInferer", "WindowedDenoiser", "fit_window", "pad_spatial"]


def fit_window(roi_size: Sequence[int] | int, spatial: Sequence[int], size_divisible: int = 1) -> list[int]:
    """The window for an image of spatial size ``spatial``: ``roi_size`` shrunk, axis by axis, to the image size
    rounded up to a multiple of ``size_divisible`` (the network's total downsampling): a thin volume gets a thin
    window (8 slices, roi 32, divisibility 8: 8 slices), padded by at most ``size_divisible - 1`` voxels per axis.
    ``fit_window(roi (D,) or int, spatial (D,), m) -> window (D,)``."""
    if size_divisible < 1:
        raise ValueError(f"size_divisible={size_divisible} must be >= 1")
    roi = ensure_tuple_rep(roi_size, len(spatial))
    return [min(int(r), -(-int(s) // size_divisible) * size_divisible) for r, s in zip(roi, spatial, strict=True)]


def pad_spatial(
    x: torch.Tensor,
    spatial_size: Sequence[int],
    mode: PytorchPadMode | str = PytorchPadMode.REPLICATE,
    method: str = "end",
) -> tuple[torch.Tensor, tuple]:
    """Pad the spatial axes of ``x`` (B, C, *S) up to ``spatial_size`` (larger axes are kept) with MONAI's
    ``SpatialPad`` (``mode`` "replicate" = edge replication; ``method`` "end" or "symmetric").

    Returns the padded plain tensor (B, C, *S') and the index that crops an output (B, C', *S') back to S.
    Edge replication, not zeros: a zero (air / black) slab in a window shifts the statistics of every per-window
    instance / group norm of the network, and the network never saw such slabs in training.
    """
    spatial = x.shape[2:]
    padder = SpatialPad(spatial_size, method=method, mode=mode)
    widths = padder.compute_pad_width(spatial)[1:]
    crop = (slice(None), slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(widths, spatial, strict=True)))
    plain = convert_to_tensor(x, track_meta=False)
    if not any(lo or hi for lo, hi in widths):
        return plain, crop
    padded = padder(plain.reshape(-1, *spatial))  # SpatialPad pads (C, *S): batch and channels folded together
    return convert_to_tensor(padded, track_meta=False).reshape(*x.shape[:2], *padded.shape[1:]), crop


@dataclass
class _WindowContext:
    """The whole image (B, C_img, *S) and the per-window conditioning cache, keyed by window coordinates."""

    image: torch.Tensor
    cache: dict[Any, Any] = field(default_factory=dict)


def _window_key(coords: Sequence[Sequence[slice]]) -> tuple:
    return tuple(tuple((s.start, s.stop) for s in window) for window in coords)


class WindowedDenoiser(ConditionalDenoiser):
    """Evaluates ``denoiser`` on overlapping windows of the whole x_t and blends the outputs.

    ``encode_condition(image)`` only records the image; ``denoise(x_t (B·N, C, *S), t, ctx)`` runs
    ``sliding_window_inference`` over ``[image, x_t of the N members]`` and returns the blended output
    (B·N, C_out, *S). ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ``sigma_scale``, ``padding_mode`` and
    ``progress`` go to MONAI's ``sliding_window_inference``; ``cache_condition`` keeps each window's
    ``encode_condition`` result for all steps of one image.

    An image smaller than ``roi_size`` is padded by MONAI (symmetrically) with ``padding_mode``: "replicate" (edge
    replication of the image and of x_t) by default, as :func:`pad_spatial` argues; the padded voxels are only read
    by the network and cropped from its output, x_t is never stepped there. Because the padding is redone on every
    call, the chain's noise has the image's own shape, so a per-voxel network still gives the whole-image sample.
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.25,
        mode: BlendMode | str = BlendMode.GAUSSIAN,
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: PytorchPadMode | str = PytorchPadMode.REPLICATE,
        cache_condition: bool = True,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.cache_condition = cache_condition
        self.window_kwargs = {  # passed on to monai.inferers.sliding_window_inference
            "roi_size": roi_size,
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
            "mode": mode,
            "sigma_scale": sigma_scale,
            "padding_mode": padding_mode,
            "progress": progress,
        }

    def encode_condition(self, image: torch.Tensor) -> _WindowContext:
        return _WindowContext(image)

    def _features(self, image_windows: torch.Tensor, coords: Sequence[Sequence[slice]], ctx: _WindowContext) -> Any:
        if not self.cache_condition:
            return self.denoiser.encode_condition(image_windows)
        key = _window_key(coords)
        if key not in ctx.cache:
            ctx.cache[key] = self.denoiser.encode_condition(image_windows)
        return ctx.cache[key]

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: _WindowContext) -> torch.Tensor:
        image = features.image
        b, c_img = image.shape[:2]
        n, c = x_t.shape[0] // b, x_t.shape[1]
        if not bool((timesteps == timesteps[0]).all()):
            raise ValueError("window-consistent sampling needs one timestep for the whole batch")
        t = timesteps[0]

        def predictor(window: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
            k, roi = window.shape[0], window.shape[2:]
            x_w = window[:, c_img:].reshape(k * n, c, *roi)  # (k·N, C, *roi), b-major like repeat_batch
            feats = repeat_batch(self._features(window[:, :c_img], coords, features), n)
            out = self.denoiser.denoise(x_w, t.expand(k * n), feats)
            return out.reshape(k, n * out.shape[1], *roi)

        stacked = torch.cat([image, x_t.reshape(b, n * c, *x_t.shape[2:])], dim=1)  # (B, C_img + N·C, *S)
        out = sliding_window_inference(stacked, predictor=predictor, with_coord=True, **self.window_kwargs)
        out = convert_to_tensor(out, track_meta=False)
        return out.reshape(b * n, out.shape[1] // n, *out.shape[2:])


class WindowConsistentInferer(Inferer):
    """MONAI inferer: ``inferer(image (B, C_img, *S), segmenter) -> scores (B, C, *S)`` with one global chain.

    Args:
        roi_size: window size (spatial); never larger than the image rounded up to ``size_divisible``
            (:func:`fit_window`): a thin volume gets a thin window, its remainder padded by edge replication.
        size_divisible: the network's total downsampling (a small image is not padded to a large ``roi_size``).
        window_args: the other :class:`WindowedDenoiser` arguments — ``sw_batch_size`` (windows per denoiser call,
            each with the N ensemble members), ``overlap`` (0 tiles without overlap, as SegDiff's 256² tiles),
            ``mode`` (``"gaussian"`` or ``"constant"`` blending), ``sigma_scale``, ``padding_mode``,
            ``cache_condition`` (each window's image conditioning once per image, or at every step), ``progress``.

    The segmenter's ``last_uncertainty`` and ``last_samples`` cover the whole image after the call. A ``MetaTensor``
    input gives a ``MetaTensor`` output with the input's metadata, as MONAI's ``SlidingWindowInferer`` does.
    """

    def __init__(self, roi_size: Sequence[int] | int, size_divisible: int = 1, **window_args: Any) -> None:
        super().__init__()
        if size_divisible < 1:
            raise ValueError(f"size_divisible={size_divisible} must be >= 1")
        inspect.signature(WindowedDenoiser).bind(None, roi_size, **window_args)  # TypeError names an unknown argument
        self.roi_size, self.size_divisible, self.window_args = roi_size, size_divisible, window_args

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        segmenter = getattr(network, "module", network)  # DistributedDataParallel / DataParallel wrap
        if not isinstance(segmenter, DiffusionSegmenter):
            raise TypeError(f"WindowConsistentInferer needs a DiffusionSegmenter, got {type(segmenter).__name__}")
        if segmenter.latent_decoder is not None or segmenter.latent_downsample != 1:
            raise ValueError("window-consistent sampling works in pixel space only (no latent_decoder)")
        roi = fit_window(self.roi_size, inputs.shape[2:], self.size_divisible)  # never beyond the rounded image
        window = WindowedDenoiser(segmenter.denoiser, roi, **self.window_args)
        try:
            out = segmenter.predict(inputs, denoiser=window)
        except ValueError as error:  # torch's instance norm on a one-voxel level, deep inside the network
            if "more than 1 spatial element" not in str(error):
                raise
            raise ValueError(
                f"an image of spatial size {tuple(inputs.shape[2:])} (as the network gets it, after any resampling) "
                f"is too small for this network: its window {roi} leaves a single voxel at a level where the network "
                "normalises over space; resample the image to a finer grid, or check that it is the intended image"
            ) from None
        segmenter.last_uncertainty, segmenter.last_samples = out.uncertainty, out.samples
        return convert_to_dst_type(out.probs, inputs)[0]  # a MetaTensor input's metadata travels on (Invertd)


class StitchedUncertaintyInferer(Inferer):
    """Wrap an inferer that calls the segmenter on parts of the image (MONAI's ``SliceInferer``, or
    ``SlidingWindowInferer`` with a chain per window) so that the segmenter's ``last_uncertainty`` afterwards covers
    the whole image, not only the last part.

    Each call's maps travel as extra output channels through the wrapped inferer's stitching (slices stacked, windows
    blended like the scores) and are split off at the end: ``inferer(image (B, C_img, *S), segmenter) -> scores
    (B, C, *S)``, with ``last_uncertainty = Uncertainty(std (B, C, *S), entropy (B, 1, *S))``.
    """

    def __init__(self, inferer: Inferer) -> None:
        super().__init__()
        self.inferer = inferer

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        segmenter = getattr(network, "module", network)
        if not isinstance(segmenter, DiffusionSegmenter):
            raise TypeError(f"StitchedUncertaintyInferer needs a DiffusionSegmenter, got {type(segmenter).__name__}")

        def with_maps(part: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            scores = network(part, *a, **k)
            maps = segmenter.last_uncertainty
            return torch.cat([scores, maps.std.to(scores), maps.entropy.to(scores)], dim=1)

        out = self.inferer(inputs, with_maps, *args, **kwargs)
        c = (out.shape[1] - 1) // 2
        plain = convert_to_tensor(out, track_meta=False)
        segmenter.last_uncertainty = Uncertainty(plain[:, c : 2 * c], plain[:, 2 * c :])
        return out[:, :c]
