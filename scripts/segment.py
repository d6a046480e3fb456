"""Folder inference with a MONAI DiffSeg bundle: NIfTI / NRRD / MHA / PNG / TIFF / DICOM in, NIfTI + DICOM SEG +
RTSTRUCT + uncertainty + overlay PNG + statistics + manifest out.

    python scripts/segment.py --bundle bundles/recycling_ddpm_3d_segmentation --input scans/ --output seg/
    python scripts/segment.py --bundle … --input scans/,other/ct.nii.gz --output seg/   # several inputs
    python scripts/segment.py --bundle … --input … --output … --formats nifti,dicom_seg,rtstruct,uncertainty,png \\
        --steps 5 --samples 3 --seed 0 --statistics --resume                         # samples ≥ 2: review flag (qc)
    python scripts/segment.py --bundle … --runtime onnxruntime [--onnx denoiser.onnx]   # ONNX Runtime denoiser
    python scripts/segment.py --bundle bundles/segdiff_2d_segmentation --configs inference.json,inference_slices.json \
        --input volumes/ --output seg/                                                 # a bundle's config variant
    torchrun --nproc_per_node=2 scripts/segment.py --bundle … --input … --output …     # cases sharded by rank

The bundle's own configs/inference.json defines preprocessing, network, inferer and postprocessing (see
``diffseg.deploy``). Exit code 0 only when every case is "ok" or "skipped"; ``<output>/manifest.json`` says why not.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

from diffseg.deploy import FORMATS, RUNTIMES, dist_info, exit_code, load_bundle, segment_folder, use_onnxruntime  # noqa: E402


def _list(value: str | tuple | list) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(i).strip() for i in items if str(i).strip()]


def main(
    bundle: str,
    input: str | tuple[str, ...],  # noqa: A002 - the documented flag name
    output: str,
    device: str = "cpu",
    steps: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
    formats: str = "nifti,dicom_seg,png",
    runtime: str = "torch",
    onnx: str | None = None,
    resume: bool = False,
    overrides: dict | None = None,
    configs: str | tuple[str, ...] = "inference.json",
    quiet: bool = False,
    statistics: bool = False,
    qc_threshold: float | None = None,
) -> int:
    """Segment every case under ``input`` with ``bundle``; outputs and manifest.json in ``output``.

    Args:
        bundle: bundle folder, e.g. bundles/recycling_ddpm_3d_segmentation.
        input: a file or a folder (searched recursively; DICOM series are grouped), or several, comma-separated.
        output: output folder (one sub-folder per case + manifest.json).
        device: cpu | cuda | cuda:N (under torchrun: cuda → cuda:LOCAL_RANK).
        steps, samples, seed: the bundle's displayable_configs num_inference_steps / num_samples / seed.
        formats: comma-separated subset of nifti, dicom_seg and rtstruct (DICOM inputs), uncertainty, png (overlay).
        runtime: torch | onnxruntime (the denoiser runs in ONNX Runtime; exported on the fly unless --onnx).
        onnx: an exported denoiser step (scripts/export.py) for --runtime onnxruntime.
        resume: skip cases whose manifest entry is "ok" and whose outputs exist.
        overrides: more config ids → values, e.g. '{"ckpt_path": "my.pt"}'.
        configs: the bundle's config files merged in order (comma-separated names in its configs/ folder), e.g.
            inference.json,inference_slices.json for SegDiff on 3D volumes slice by slice.
        quiet: no progress bars.
        statistics: per-structure statistics.json per case and statistics.csv over the run.
        qc_threshold: the review flag's threshold on the ensemble disagreement inside the foreground (default: the
            bundle's qc_threshold); the flag needs --samples ≥ 2.

    Returns:
        The exit code (0: every case ok or skipped).
    """
    fmts = _list(formats)
    bad = sorted(set(fmts) - set(FORMATS))
    if bad or runtime not in RUNTIMES:
        raise SystemExit(f"unknown format(s) {bad} (choose from {FORMATS}) or runtime {runtime!r} ({RUNTIMES})")
    rank, world = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
    try:
        # the uncertainty map: required for --formats uncertainty, else on where the bundle has one and it is used
        unc = True if "uncertainty" in fmts else (None if statistics or (samples or 0) >= 2 else False)
        model = load_bundle(
            bundle, device, steps, samples, seed, unc, overrides, _list(configs), qc_threshold=qc_threshold
        )
        if runtime == "onnxruntime":
            cache = Path(output) / ".export"
            cache.mkdir(parents=True, exist_ok=True)
            use_onnxruntime(model, onnx, cache)
        inputs = _list(input)
        manifest = segment_folder(
            model, inputs, output, fmts, resume, progress=not quiet, runtime=runtime, statistics=statistics
        )
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    code = exit_code(manifest)
    if rank == 0 and not quiet:
        counts = {s: sum(c["status"] == s for c in manifest["cases"]) for s in ("ok", "skipped", "failed")}
        print(json.dumps(counts), f"→ {Path(output) / 'manifest.json'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(fire.Fire(main, serialize=lambda code: None))
