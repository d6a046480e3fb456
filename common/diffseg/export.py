"""Export a :class:`~diffseg.segmenter.DiffusionSegmenter` to ONNX / TorchScript and run its denoiser in ONNX Runtime.

Two graphs:

- **denoiser step** (:class:`DenoiserStep`): ``(x_t (B, C, *S_x), timesteps (B,) int64, features (B, C_f, *S)) →
  output (B, C, *S_x)``, the network call the sampler makes once per reverse step; batch and spatial axes are
  dynamic (``torch.export.Dim.AUTO``: the exporter keeps whatever divisibility the network needs). The image
  encoder (``encode_condition``) stays in torch; it runs once per image.
- **unrolled sampler** (:class:`UnrolledSampler`) for a fixed number of steps (the 5-step recycling DDPM,
  SDSeg's single step): ``(image (B, C_img, *S), noise (B, C, *S_x), step_noise (K, B, C, *S_x)) → per-class
  probabilities (B, C_out, *S)``, the whole chain with its randomness as explicit inputs (K = steps that add
  noise). Same noise → same result as ``segmenter.predict`` (see :func:`sampler_noise`). It runs on the whole
  image (no sliding windows) and one chain per batch item (ensembles: repeat the image in the batch).

ONNX export uses ``torch.onnx.export(..., dynamo=True)`` (the default exporter of torch ≥ 2.9, which needs
``onnxscript``); TorchScript uses ``torch.jit.trace``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from diffseg.denoiser import ConditionalDenoiser
from diffseg.segmenter import DiffusionSegmenter

__all__ = [
    "EXPORT_FORMATS",
    "DenoiserStep",
    "export_denoiser",
    "OrtDenoiser",
    "UnrolledSampler",
    "example_shape",
    "export_module",
    "noisy_steps",
    "ort_session",
    "sampler_noise",
]

EXPORT_FORMATS = ("onnx", "torchscript")


def example_shape(spatial_shape: Sequence[int | str], minimum: int = 2) -> tuple[int, ...]:
    """A spatial example size for tracing from metadata ``spatial_shape`` items (``"32*n"`` → 64; ints kept).

    Each axis gets ``minimum`` times its divisibility factor, so no axis is traced at size 1 (which would make the
    exporter specialise it).
    """
    sizes = []
    for item in spatial_shape:
        if isinstance(item, int) or str(item).isdigit():
            sizes.append(int(item))
            continue
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(item))
        sizes.append(minimum * (int(match.group(1)) if match else 16))
    return tuple(sizes)


class DenoiserStep(nn.Module):
    """``denoiser.denoise`` as a module with tensor inputs (the graph ONNX Runtime runs once per step)."""

    def __init__(self, denoiser: ConditionalDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.denoiser.denoise(x_t, timesteps, features)


def export_denoiser(
    segmenter: DiffusionSegmenter,
    image_meta: dict[str, Any],
    path: str | os.PathLike[str],
    fmt: str = "onnx",
    shape: Sequence[int] | None = None,
) -> tuple[Path, torch.Tensor]:
    """Export ``segmenter``'s :class:`DenoiserStep` traced at a batch of 2 (dynamic batch and spatial axes, ONNX).

    Args:
        image_meta: the bundle metadata's ``network_data_format.inputs.image`` (``num_channels``, ``spatial_shape``).
        shape: spatial example size (default :func:`example_shape` of ``spatial_shape``).

    Returns:
        (written path, the example image (2, C_img, *S) it was traced with).
    """
    spatial = tuple(shape) if shape else example_shape(image_meta["spatial_shape"])
    image = torch.rand(2, int(image_meta["num_channels"]), *spatial)
    features = segmenter.denoiser.encode_condition(image)
    x_t = torch.randn(2, segmenter.sample_channels, *[s // segmenter.latent_downsample for s in spatial])
    dims = (0, *range(2, 2 + len(spatial)))
    args = (x_t, torch.tensor([1, 1]), features)
    return export_module(DenoiserStep(segmenter.denoiser), args, path, fmt, None, [dims, (0,), dims]), image


def noisy_steps(segmenter: DiffusionSegmenter, steps: int | None = None) -> list[int]:
    """The listed timesteps whose reverse step adds noise (all but the last for DDPM; none for DDIM η = 0)."""
    scheduler = segmenter.scheduler
    scheduler.set_timesteps(steps or segmenter.num_inference_steps or scheduler.num_train_timesteps)
    variance = getattr(scheduler, "step_variance", None)
    if variance is None:  # samplers without a variance table add no noise (e.g. deterministic DDIM)
        return []
    return [t for t in scheduler.timesteps.tolist() if variance(t) > 0]


def sampler_noise(
    segmenter: DiffusionSegmenter, image: torch.Tensor, seed: int, steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, C, *S_x), step_noise (K, B, C, *S_x)) drawn exactly as ``segmenter.predict`` draws them
    (num_samples = 1) with ``seed``, so the unrolled sampler reproduces the torch result."""
    generator = torch.Generator(device=image.device).manual_seed(int(seed))
    spatial = [s // segmenter.latent_downsample for s in image.shape[2:]]
    shape = (image.shape[0], segmenter.sample_channels, *spatial)
    noise = torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype)
    steps_noise = [
        torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype)
        for _ in noisy_steps(segmenter, steps)
    ]
    return noise, torch.stack(steps_noise) if steps_noise else torch.zeros((0, *shape), dtype=image.dtype)


class UnrolledSampler(nn.Module):
    """The segmenter's whole reverse chain for ``steps`` steps with explicit noise (see module docstring).

    ``forward(image, noise, step_noise) -> probs``; ``step_noise[k]`` is the noise of the k-th noisy step, in
    the order of :func:`noisy_steps`.
    """

    def __init__(self, segmenter: DiffusionSegmenter, steps: int | None = None) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.steps = steps or segmenter.num_inference_steps or segmenter.scheduler.num_train_timesteps
        self.noisy = noisy_steps(segmenter, self.steps)  # also sets the scheduler's timesteps
        self.timesteps = [int(t) for t in segmenter.scheduler.timesteps.tolist()]
        self.tables = _scalar_tables(segmenter.scheduler, self.timesteps)  # before tracing: float(tensor) can't be

    def forward(self, image: torch.Tensor, noise: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
        seg = self.segmenter
        scheduler = seg.scheduler
        features = seg.denoiser.encode_condition(image)
        supplied = iter(step_noise.unbind(0) if len(self.noisy) else ())
        x, x0 = noise, noise
        with _traceable(scheduler, self.tables, supplied):
            for t in self.timesteps:
                timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                out = seg.denoiser.denoise(x, timesteps, features)
                if seg.logits_output:
                    out = seg.codec.logits_to_x(out)
                x, x0 = scheduler.step(out, t, x)
        if seg.latent_decoder is not None:
            x0 = seg.latent_decoder(x0)
        return seg.codec.decode(x0)


def _scalar_tables(scheduler: Any, timesteps: Sequence[int]) -> dict[str, dict[int, Any]]:
    """The scheduler's per-step Python scalars (ᾱ pairs, step variances) for ``timesteps``."""
    tables = {"alpha_prod_pair": {t: scheduler.alpha_prod_pair(t) for t in timesteps}}
    if hasattr(scheduler, "step_variance"):
        tables["step_variance"] = {t: scheduler.step_variance(t) for t in timesteps}
    return tables


@contextlib.contextmanager
def _traceable(scheduler: Any, tables: dict[str, dict[int, Any]], supplied: Iterator[torch.Tensor]) -> Iterator[None]:
    """Make ``scheduler`` take its step noise from ``supplied`` instead of drawing it, and read its per-step
    scalars from ``tables`` (:func:`_scalar_tables`, computed before tracing)."""
    for name, table in tables.items():
        setattr(scheduler, name, table.__getitem__)
    scheduler._noise_like = lambda sample, generator: next(supplied)
    try:
        yield
    finally:
        for name in (*tables, "_noise_like"):
            delattr(scheduler, name)  # back to the class's methods


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    fmt: str = "onnx",
    names: Sequence[str] | None = None,
    dynamic: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Export ``module`` traced at ``args`` to ``path`` (written to a temporary name, then renamed).

    Args:
        names: input names (ONNX); default the forward's parameter names.
        dynamic: per input, the axes to keep dynamic (ONNX, ``Dim.AUTO``); None: static shapes.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {EXPORT_FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    module = module.eval()
    try:
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(module, args, check_trace=False).save(str(tmp))
            else:
                shapes = None
                if dynamic is not None:
                    import inspect

                    params = names or list(inspect.signature(module.forward).parameters)
                    auto = torch.export.Dim.AUTO
                    shapes = {p: {a: auto for a in axes} for p, axes in zip(params, dynamic, strict=True)}
                program = torch.onnx.export(module, args, dynamic_shapes=shapes, dynamo=True, verbose=False)
                program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ort_session(path: str | os.PathLike[str], threads: int | None = None, device: str = "cpu"):
    """An ONNX Runtime session: CUDAExecutionProvider first when ``device`` is CUDA and onnxruntime-gpu has it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


class OrtDenoiser(ConditionalDenoiser):
    """A denoiser whose ``denoise`` runs an exported :class:`DenoiserStep` graph in ONNX Runtime.

    ``encode_condition`` stays the torch denoiser's (once per image); its result must be one tensor.
    """

    def __init__(self, denoiser: ConditionalDenoiser, path: str | os.PathLike[str], device: str = "cpu") -> None:
        super().__init__()
        self.torch_denoiser = denoiser
        self.session = ort_session(path, device=device)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode_condition(self, image: torch.Tensor) -> Any:
        return self.torch_denoiser.encode_condition(image)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: Any) -> torch.Tensor:
        if not torch.is_tensor(features):
            raise TypeError(f"the ONNX denoiser takes one feature tensor, got {type(features).__name__}")
        arrays = [x_t, timesteps.to(torch.int64), features]
        feed = {
            n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(self.input_names, arrays, strict=True)
        }
        (out,) = self.session.run(None, feed)
        return torch.from_numpy(out).to(x_t.device)
