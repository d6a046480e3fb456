"""Helpers shared by the bundle tests: run a bundle in-process, verify its metadata and network, write test images.

Every bundle ships its own ``scripts`` package, so :func:`bundle_imports` puts the bundle root first on ``sys.path``
and forgets any previously imported ``scripts`` modules (as MONAI Label does before each parse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser, run, verify_metadata, verify_net_in_out

from diffseg.bundles import bundle_imports as _bundle_imports
from diffseg.bundles import bundle_parser, config_files

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "meta_schema_20240725.json"  # offline copy of the model-zoo metadata schema
FEEDFORWARD = ("train.json", "train_feedforward.json")  # a diffusion bundle's feed-forward twin (paper 001, E1)
TWIN_WEIGHTS = "model_feedforward.pt"
FIVE_ORGANS = ("liver", "spleen", "stomach", "aorta", "inferior vena cava")  # the 3D bundles' floors (issues 16, 19)

__all__ = [
    "BUNDLES",
    "FEEDFORWARD",
    "REPO",
    "SCHEMA",
    "bundle_imports",
    "check_metadata",
    "check_feedforward_input",
    "check_net_in_out",
    "check_resumable_training",
    "bad_volume_cases",
    "dice",
    "bad_volume_folder",
    "error_text",
    "infer_images",
    "load_config",
    "random_ct",
    "read_nifti",
    "train_and_evaluate_twin",
    "run_bundle",
    "run_torchrun",
    "save_weights",
    "write_nifti",
]


def bundle_imports(bundle: str | Path):
    """``diffseg.bundles.bundle_imports`` for a bundle name (or path)."""
    return _bundle_imports(BUNDLES / bundle)


def run_bundle(bundle: str | Path, configs: Sequence[str] = ("inference.json",), run_id: str = "run", **override: Any):
    """``python -m monai.bundle run`` in-process: ``configs`` are merged in order, ``override`` are id → value."""
    with bundle_imports(bundle) as root:
        return run(
            run_id=run_id,
            config_file=config_files(root, configs),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"),
            bundle_root=str(root),
            **override,
        )


def patient_b_dice(bundle: str | Path, tmp_path: Path, extra: Sequence[str] = (), **override: Any) -> dict[str, float]:
    """Per-class Dice of a 3D bundle's shipped weights on patient B (never trained on) against its TotalSegmentator
    pseudo-labels, in the bundle's evaluation grid: its ``prepare_data.py`` then ``train.json`` + ``extra`` configs
    (e.g. the twin's) + ``evaluate.json`` with the inference defaults. Returns class name → Dice (no background)."""
    with bundle_imports(bundle):
        from scripts.prepare_data import prepare
    prepare(tmp_path / "data")
    configs = ["train.json", *extra, "evaluate.json"]
    run_bundle(bundle, configs, dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path), **override)
    header, row = (line.split(",") for line in (tmp_path / "val_mean_dice_raw.csv").read_text().splitlines()[:2])
    names = load_config(bundle, configs).get_parsed_content("channel_names")
    assert header[1 : 1 + len(names)] == [f"class{i}" for i in range(len(names))]  # MetricsSaver: no background
    return {names[str(i + 1)]: float(row[i + 1]) for i in range(len(names))}


def infer_images(
    bundle: str | Path,
    tmp_path: Path,
    images: dict[str, tuple[np.ndarray, np.ndarray | None]],
    configs: Sequence[str] = ("inference.json",),
    **override: Any,
) -> Path:
    """Write ``images`` (file name → (array, affine)) to ``tmp_path/in``, run the bundle's inference on that folder
    into ``tmp_path/out`` (``override`` e.g. a tiny network and its ``ckpt_path``) and return the output folder."""
    folder, out = tmp_path / "in", tmp_path / "out"
    for name, (array, affine) in images.items():
        write_nifti(folder / name, array, affine)
    run_bundle(bundle, configs, **{"dataset_dir": str(folder), "output_dir": str(out), **override})
    return out


def run_torchrun(
    bundle: str | Path, cwd: Path, configs: Sequence[str] = ("train.json", "multi_gpu_train.json"), **override: Any
) -> None:
    """``torchrun --nproc_per_node=2 -m monai.bundle run`` (gloo on CPU) in a subprocess; ``override`` are passed as
    ``--id <json>``. Fails with the processes' output when the run does not exit cleanly."""
    root = BUNDLES / bundle
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "common"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", str(config_files(root, configs)), "--bundle_root", str(root)]
    cmd += ["--meta_file", str(root / "configs" / "metadata.json")]
    for key, value in override.items():
        cmd += [f"--{key}", json.dumps(value)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def load_config(bundle: str | Path, configs: Sequence[str] = ("inference.json",), **override: Any) -> ConfigParser:
    """The merged, parsed config (ids resolve with ``parser.get_parsed_content(id)`` inside ``bundle_imports``)."""
    return bundle_parser(BUNDLES / bundle, configs, **override)


def check_feedforward_input(bundle: str | Path, batch: dict[str, Any], **override: Any) -> tuple:
    """Prepare ``batch`` (image, label with foreground) with the twin's ``train#prepare_batch`` twice from the same
    seed, once with an all-background label: the network input must be the same noise (no mask information), equal
    to ``target["x_t"]``, at t = T-1 for every sample, while the x0 targets differ. Returns the first prepared batch."""
    import torch

    with bundle_imports(bundle):
        prepare = load_config(bundle, FEEDFORWARD, **override).get_parsed_content("train#prepare_batch")
    outs = []
    for label in (batch["label"], torch.zeros_like(batch["label"])):
        torch.manual_seed(0)
        outs.append(prepare({**batch, "label": label}))
    (x, target, _, kwargs), (x2, target2, _, _) = outs
    assert torch.equal(x, x2) and torch.equal(x, target["x_t"]) and torch.equal(x, target["noise"])
    assert not torch.equal(target["x0"], target2["x0"])
    assert kwargs["timesteps"].tolist() == [prepare.num_train_timesteps - 1] * x.shape[0]
    return outs[0]


def train_and_evaluate_twin(bundle: str | Path, metrics_csv: Path, **override: Any) -> float:
    """Train the feed-forward twin (``train.json`` + ``train_feedforward.json``, ``override`` sized for 2 iterations,
    with a ``ckpt_dir``), check that it wrote its own weights file there (not ``model.pt``), evaluate that checkpoint
    with ``evaluate.json`` and return the mean Dice it reports in ``metrics_csv``."""
    ckpt_dir = Path(override["ckpt_dir"])
    parser = load_config(bundle, FEEDFORWARD, **override)
    with bundle_imports(bundle):
        parser.get_parsed_content("run")
        assert parser.get_parsed_content("train#trainer").state.iteration == 2
    assert (ckpt_dir / TWIN_WEIGHTS).exists() and not (ckpt_dir / "model.pt").exists()
    run_bundle(bundle, (*FEEDFORWARD, "evaluate.json"), **override)
    lines = metrics_csv.read_text().replace("\t", ",").splitlines()  # MetricsSaver: "name,value" per line
    rows = dict(line.split(",", 1) for line in lines if "," in line)
    dice = float(rows["val_mean_dice"])
    assert 0.0 <= dice <= 1.0
    return dice


def check_resumable_training(
    bundle: str | Path,
    configs: Sequence[str],
    epochs_id: str = "max_epochs",
    weights: str = "model.pt",
    curve_dir: str | Path | None = None,
    **override: Any,
) -> None:
    """A training config through ``monai.bundle run`` for one epoch, then continued with ``resume`` to two: the
    training checkpoint (``<weights stem>.checkpoint.pt``) carries the trainer's iteration and continues it, the
    shipped ``weights`` stay a plain ``weights_only`` state_dict (the EMA's, differing from the live weights, when
    ``ema_decay`` is set), and ``curve.csv`` (in ``curve_dir``, default ``output_dir``) has a loss and an LR for every
    iteration of both runs. ``override`` sizes the run and names ``ckpt_dir`` / ``output_dir``."""
    import torch

    from diffseg.curves import read_curve
    from diffseg.handlers import checkpoint_name

    ckpt_dir, args = Path(override["ckpt_dir"]), {**override, "curve_log_interval": 1}
    run_bundle(bundle, configs, **{**args, epochs_id: 1})
    per_epoch = torch.load(ckpt_dir / checkpoint_name(weights), weights_only=True)["trainer"]["iteration"]
    assert per_epoch >= 1
    run_bundle(bundle, configs, **{**args, epochs_id: 2, "resume": True})
    state = torch.load(ckpt_dir / checkpoint_name(weights), weights_only=True)
    assert state["trainer"]["iteration"] == 2 * per_epoch and state["clock"]["seconds"] > 0
    shipped = torch.load(ckpt_dir / weights, weights_only=True)
    assert shipped and all(isinstance(v, torch.Tensor) for v in shipped.values())
    if override.get("ema_decay") is not None:
        assert shipped.keys() == state["model"].keys()
        assert any(not torch.equal(shipped[k], state["model"][k]) for k in shipped)
    rows = read_curve(Path(curve_dir or override["output_dir"]) / "curve.csv")
    logged = [r for r in rows if "loss" in r]
    assert [int(r["iteration"]) for r in logged] == list(range(1, 2 * per_epoch + 1))
    assert all("lr" in r and r["lr"] > 0 for r in logged)


def check_metadata(bundle: str | Path) -> None:
    """``python -m monai.bundle verify_metadata`` against the offline schema copy; raises on failure."""
    root = Path(BUNDLES / bundle)
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))


def check_net_in_out(bundle: str | Path, **override: Any) -> None:
    """``python -m monai.bundle verify_net_in_out network_def`` (override e.g. a tiny network or spatial shape)."""
    with bundle_imports(bundle) as root:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            device="cpu",
            bundle_root=str(root),
            **override,
        )


def save_weights(net: Any, path: str | Path) -> str:
    """Save ``net``'s plain ``{name: tensor}`` state_dict (what a shipped model.pt is) to ``path``; returns it."""
    import torch

    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return str(path)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (spatial axes first) as NIfTI with ``affine`` (default: 1.5 mm isotropic RAS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine), path)
    return path


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two masks (non-zero = foreground); 0 when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    return float(2 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1))


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI file."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def error_text(exc: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps a transform's error in several layers)."""
    parts = []
    while exc is not None and len(parts) < 20:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def random_ct(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Uniform random HU values in [-1000, 400] of ``shape`` (float32)."""
    return np.random.default_rng(seed).uniform(-1000, 400, shape).astype(np.float32)


# bad volume inputs of a 3D bundle's folder inference → the text its error must contain
BAD_VOLUMES = {
    "empty": "no images",
    "missing": "is not a folder",
    "4d": "bad.nii.gz: expected 1 channel(s), got 3",
    "2d": "bad.nii.gz: expected a 3D image",
    "nan": "bad.nii.gz: image contains NaN",
    "corrupt": "bad.nii.gz",
}


def bad_volume_cases(*exclude: str) -> list[tuple[str, str]]:
    """``(case, expected error text)`` pairs of :data:`BAD_VOLUMES` for ``pytest.mark.parametrize``."""
    return [(case, match) for case, match in BAD_VOLUMES.items() if case not in exclude]


def bad_volume_folder(tmp_path: Path, case: str) -> Path:
    """Write the bad input ``case`` into ``tmp_path/in`` and return the folder to give as ``dataset_dir``."""
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    if case == "4d":
        write_nifti(folder / "bad.nii.gz", random_ct((10, 10, 10, 3)))
    elif case == "2d":
        write_nifti(folder / "bad.nii.gz", random_ct((32, 32)))
    elif case == "nan":
        array = random_ct((16, 16, 8))
        array[3, 3, 3] = np.nan
        write_nifti(folder / "bad.nii.gz", array)
    elif case == "corrupt":
        (folder / "bad.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    return tmp_path / "nowhere" if case == "missing" else folder
