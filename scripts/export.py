"""Export a bundle's denoiser (one step) and, for fixed-step samplers, its whole unrolled sampler.

    python scripts/export.py --bundle bundles/recycling_ddpm_3d_segmentation --format onnx --output denoiser.onnx
    python scripts/export.py --bundle … --format torchscript --output denoiser.ts
    python scripts/export.py --bundle … --format onnx --output denoiser.onnx --sampler true   # + denoiser_sampler.onnx

The denoiser graph is ``(x_t, timesteps, features) → output`` with dynamic batch and spatial axes (ONNX); the
sampler graph is ``(image, noise, step_noise) → probabilities`` (see ``diffseg.export``). ``segment.py --runtime
onnxruntime --onnx denoiser.onnx`` runs the exported denoiser in ONNX Runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

from diffseg.deploy import load_bundle  # noqa: E402
from diffseg.export import (  # noqa: E402
    EXPORT_FORMATS,
    UnrolledSampler,
    export_denoiser,
    export_module,
    sampler_noise,
)

MAX_UNROLLED_STEPS = 10


def main(
    bundle: str,
    output: str,
    format: str = "onnx",  # noqa: A002 - the documented flag name
    sampler: bool | None = None,
    steps: int | None = None,
    shape: tuple[int, ...] | None = None,
    overrides: dict | None = None,
) -> list[str]:
    """Export ``bundle``'s denoiser to ``output``; returns the written paths.

    Args:
        bundle: bundle folder.
        output: file for the denoiser step; the sampler goes to ``<stem>_sampler<suffix>`` next to it.
        format: onnx | torchscript.
        sampler: also export the unrolled sampler (None: when the bundle samples in ≤ 10 steps).
        steps: sampler steps (default: the bundle's displayable_configs#num_inference_steps).
        shape: spatial example shape for tracing (default: from metadata spatial_shape, e.g. "32*n" → 64).
        overrides: config ids → values (e.g. a different ckpt_path).
    """
    if format not in EXPORT_FORMATS:
        raise SystemExit(f"format={format!r}; expected one of {EXPORT_FORMATS}")
    model = load_bundle(bundle, steps=steps, overrides=overrides)
    net = model.network
    if not hasattr(net, "denoiser"):
        raise SystemExit(f"{model.name}: the network {type(net).__name__} has no diffusion denoiser to export")
    out = Path(output)
    path, image = export_denoiser(net, model.image_meta, out, format, shape)
    written = [path]
    n_steps = steps or net.num_inference_steps or net.scheduler.num_train_timesteps
    if sampler or (sampler is None and n_steps <= MAX_UNROLLED_STEPS):
        unrolled = UnrolledSampler(net, n_steps)
        noise, step_noise = sampler_noise(net, image, seed=0, steps=n_steps)
        dims = (0, *range(2, image.ndim))
        noise_dims = (1, *[d + 1 for d in dims])
        path = out.with_name(f"{out.stem}_sampler{out.suffix}")
        written.append(export_module(unrolled, (image, noise, step_noise), path, format, None,
                                     [dims, dims, noise_dims]))  # fmt: skip
    for p in written:
        print(p, file=sys.stderr)
    return [str(p) for p in written]


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda paths: None)
