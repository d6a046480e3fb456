"""Deployment figures of the 3D recycling DDPM bundle: folder-inference overhead and ONNX Runtime vs eager torch.

- ``pipeline_overhead``: wall time of the bundle's own folder inference (``monai.bundle`` workflow of
  ``inference.json``: read, preprocess, sample, invert, write) over ≥ 4 volumes ÷ the summed time spent inside the
  denoiser network's forward calls. Goal ≤ 1.15.
- ``segment_overhead``: the same for the deployment CLI (``diffseg.deploy.segment_folder``, what
  ``scripts/segment.py`` runs: the next case read while the current one samples; NIfTI + overlay PNG written).
  Goal ≤ 1.15.
- ``onnxruntime_speedup``: one denoiser call (shipped weights) in eager torch ÷ the same call in ONNX Runtime
  (CPUExecutionProvider, same thread count), exported with ``torch.onnx.export(dynamo=True)``. Goal ≥ 1.5.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from benchmarks import Figure, Timing, figure, ratio, timed
from diffseg.bundles import bundle_imports
from diffseg.deploy import load_bundle, segment_folder

from .recycling import BUNDLE, _parsed


class _ForwardClock:
    """Sums the wall time of a module's forward calls (pre/post hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        module.register_forward_hook(
            lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._start)
        )


def _folder_run(folder: Path, out: Path) -> tuple[float, float]:
    """(wall seconds of the workflow's run, seconds inside the U-Net) for the bundle's folder inference."""
    configs = BUNDLE / "configs"
    with bundle_imports(BUNDLE):
        workflow = ConfigWorkflow(
            config_file=str(configs / "inference.json"),
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            workflow_type="infer",
            bundle_root=str(BUNDLE),
            dataset_dir=str(folder),
            output_dir=str(out),
        )
        workflow.initialize()
        clock = _ForwardClock(workflow.parser.get_parsed_content("network_def").denoiser.net)
        start = time.perf_counter()
        workflow.run()
        wall = time.perf_counter() - start
        workflow.finalize()
    return wall, clock.seconds


def _segment_run(folder: Path, out: Path) -> tuple[float, float]:
    """(wall seconds of ``segment_folder`` on ``folder``, seconds inside the U-Net) with the shipped weights."""
    model = load_bundle(BUNDLE)
    clock = _ForwardClock(model.network.denoiser.net)
    start = time.perf_counter()
    manifest = segment_folder(model, folder, out, ("nifti", "png"), progress=False)
    wall = time.perf_counter() - start
    assert all(c["status"] == "ok" for c in manifest["cases"]), manifest
    return wall, clock.seconds


@figure("pipeline")
def pipeline_figures(quick: bool) -> list[Figure]:
    """Folder inference ÷ denoiser time over 4 volumes; eager ÷ ONNX Runtime per denoiser call."""
    figures = []
    shape = (96, 96, 16) if quick else (160, 128, 32)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(4):  # CT-like volumes already on the bundle's 1.5 × 1.5 × 5 mm grid
            array = rng.uniform(-1000, 400, shape).astype(np.float32)
            nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 5.0, 1.0])), folder / f"case{i}.nii.gz")
        runs = [_folder_run(folder, Path(tmp) / f"out{r}") for r in range(1 if quick else 2)]
        wall, network = Timing([w for w, _ in runs]), Timing([n for _, n in runs])
        figures.append(ratio("pipeline_overhead", wall, network, 1.15, higher_is_better=False, volumes=4, shape=shape))
        cli = [_segment_run(folder, Path(tmp) / f"cli{r}") for r in range(1 if quick else 2)]
        wall, network = Timing([w for w, _ in cli]), Timing([n for _, n in cli])
        figures.append(ratio("segment_overhead", wall, network, 1.15, higher_is_better=False, volumes=4, shape=shape))

    import onnxruntime as ort

    (segmenter,) = _parsed("network_def")
    state = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    segmenter.load_state_dict(state)
    denoiser = segmenter.denoiser.eval()
    classes = segmenter.codec.channels
    call = (64, 64, 16) if quick else (128, 128, 32)
    args = (torch.randn(1, classes, *call), torch.tensor([2]), torch.rand(1, 1, *call))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "denoiser.onnx"
        torch.onnx.export(denoiser, args, dynamo=True).save(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    with torch.no_grad():
        eager = timed(lambda: denoiser(*args), 3 if quick else 5)
        expected = denoiser(*args).numpy()
    onnx = timed(lambda: session.run(None, feed), 3 if quick else 5)
    error = float(np.abs(session.run(None, feed)[0] - expected).max())
    figures.append(ratio("onnxruntime_speedup", eager, onnx, 1.5, shape=call, max_abs_diff=error))
    return figures
