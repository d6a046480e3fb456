"""Bundles on their own, as a user who copies a bundle folder out of this repository runs them (issue 21).

The ``monai-diffseg`` wheel is built from a copy of the sources; one fresh virtual environment receives torch, the wheel
and exactly the packages a bundle's ``configs/metadata.json`` names (installed bundle by bundle: the 2D bundle's
packages go on top of the 3D bundle's). Each bundle folder is copied to ``tmp_path`` and runs there with nothing from
the repository on ``sys.path``: real-image inference with the shipped weights, then the checks a model-zoo reviewer
runs (``verify_metadata`` with the offline schema, ``verify_net_in_out``). Durations are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from bundle_testing import BUNDLES, REPO, SCHEMA, dice
from PIL import Image

from diffseg.data import data_path, totalseg_class_map

TIMEOUT = 900  # seconds per command; a cold pip install of torch + ITK is the slowest step
# (x, y, z) voxel crop of TotalSegmentator's example_ct_sm (patient A, 3 mm) around the liver: at the bundle's
# 1.5 x 1.5 x 5 mm it fits one 192 x 192 x 16 window, so the 5-step sampler runs 5 U-Net calls
CT_CROP = (slice(26, 122), slice(5, 101), slice(4, 30))
NUCLEI_CROP = (slice(0, 160), slice(384, 512))  # (rows, columns) of stardist's img2d.tif: held-out quarter, 160 x 128


def _run(cmd: Sequence[str], cwd: Path, pythonpath: Path | None = None) -> str:
    """Run ``cmd`` without the repository: no PYTHONPATH but ``pythonpath``; fails with the command's output.

    Bytecode is written (PYTHONDONTWRITEBYTECODE dropped): packages are installed with ``--no-compile``, so the first
    process compiles what it imports once instead of every process compiling torch and MONAI again."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


class Venv:
    """A fresh virtual environment (no pip of its own: this interpreter's pip installs into it with ``--python``)."""

    def __init__(self, root: Path, timings: dict[str, float]):
        self.root, self.timings = root, timings
        start = time.perf_counter()
        _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
        self.python = root / "bin" / "python"
        self.timings["venv"] = time.perf_counter() - start

    def install(self, step: str, *args: str | Path) -> None:
        """``pip install --no-compile *args`` (byte-compiling torch and ITK would take minutes), timed as ``step``."""
        start = time.perf_counter()
        _run([sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-compile", *args], self.root)
        self.timings[step] = time.perf_counter() - start

    def run(self, step: str, args: Sequence[str | Path], cwd: Path, pythonpath: Path | None = None) -> str:
        """``<venv python> *args`` in ``cwd``, timed as ``step``."""
        start = time.perf_counter()
        out = _run([self.python, *args], cwd, pythonpath)
        self.timings[step] = time.perf_counter() - start
        return out


def bundle_requirements(meta_file: Path) -> list[str]:
    """``name==version`` of everything a bundle's metadata pins (monai, torch, numpy, required packages)."""
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update(meta.get("required_packages_version", {}))
    pins.update(meta.get("optional_packages_version", {}))
    return [f"{name}=={version}" for name, version in pins.items()]


def reviewer_tools() -> list[str]:
    """What ``verify_metadata`` needs beyond the bundle's own packages: jsonschema at the project's pin."""
    text = (REPO / "requirements-bundles.txt").read_text()
    return re.findall(r"^jsonschema==\S+", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    """Seconds per step; printed when the module's tests are done."""
    measured: dict[str, float] = {}
    yield measured
    print("\nstandalone bundle timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, timings) -> Path:
    """``python -m pip wheel --no-deps`` of a copy of the distribution's sources (the checkout stays untouched)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    package = src / "common" / "diffseg"
    shutil.copytree(REPO / "common" / "diffseg", package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    start = time.perf_counter()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", dist], cwd=dist)
    timings["wheel"] = time.perf_counter() - start
    (built,) = dist.glob("monai_diffseg-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, timings) -> Venv:
    """One fresh environment for both bundles: torch and the reviewer's jsonschema; the bundles add the rest."""
    env = Venv(tmp_path_factory.mktemp("standalone") / "venv", timings)
    env.install("install_torch", f"torch=={_meta_value('pytorch_version')}", *reviewer_tools())
    return env


def _meta_value(key: str) -> str:
    """A value every bundle's metadata shares (e.g. ``pytorch_version``)."""
    values = {json.loads(p.read_text())[key] for p in BUNDLES.glob("*/configs/metadata.json")}
    assert len(values) == 1, values
    return values.pop()


def standalone_bundle(venv: Venv, wheel: Path, name: str, tmp_path: Path) -> Path:
    """Copy bundle ``name`` to ``tmp_path``, install its metadata's packages and check the environment is consistent."""
    root = shutil.copytree(BUNDLES / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    venv.install(f"{name}:install", wheel, *bundle_requirements(root / "configs" / "metadata.json"))
    _run([sys.executable, "-m", "pip", "--python", venv.python, "check"], tmp_path)
    where = "import importlib.util, sys; print(importlib.util.find_spec('diffseg').origin); print(sys.path)"
    found = _run([venv.python, "-c", where], root)
    assert found.startswith(str(venv.root)) and str(REPO) not in found, found  # the wheel's diffseg, not common/
    return root


def run_inference(venv: Venv, root: Path, images: Path, out: Path, *overrides: str) -> None:
    """``python -m monai.bundle run`` of the copied bundle's ``inference.json`` from ``images`` into ``out``."""
    configs = root / "configs"
    args = ["-m", "monai.bundle", "run", "--config_file", configs / "inference.json"]
    args += ["--meta_file", configs / "metadata.json", "--logging_file", configs / "logging.conf"]
    args += ["--bundle_root", root, "--dataset_dir", images, "--output_dir", out, *overrides]
    venv.run(f"{root.name}:inference", args, cwd=root.parent)


def verify(venv: Venv, root: Path, *overrides: str) -> None:
    """The zoo reviewer's checks inside the environment: ``verify_metadata`` (offline schema), ``verify_net_in_out``."""
    meta, schema = root / "configs" / "metadata.json", shutil.copy(SCHEMA, root.parent)
    args = ["-m", "monai.bundle", "verify_metadata", "--meta_file", meta, "--filepath", schema]
    venv.run(f"{root.name}:verify_metadata", args, cwd=root.parent)
    args = ["-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", meta]
    args += ["--config_file", root / "configs" / "inference.json", "--device", "cpu", *overrides]
    venv.run(f"{root.name}:verify_net_in_out", args, cwd=root.parent, pythonpath=root)  # as the model card says


@pytest.mark.parametrize("name", sorted(p.parents[1].name for p in BUNDLES.glob("*/configs/metadata.json")))
def test_metadata_pins_the_wheel_and_the_model_card_installs_it(name):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # numpy 2.4.6 & co. have no 3.10 builds
    meta_file = BUNDLES / name / "configs" / "metadata.json"
    assert meta_file.read_text(encoding="utf-8").isascii()  # the zoo's JSON formatter would rewrite non-ASCII
    pins = bundle_requirements(meta_file)
    assert f"monai-diffseg=={project['version']}" in pins and "fire==0.7.1" in pins  # fire: the bundle CLI
    card = (BUNDLES / name / "docs" / "README.md").read_text(encoding="utf-8")
    install = card[card.index("## Install") :].split("\n## ", 1)[0]
    wheel = f"monai_diffseg-{project['version']}-py3-none-any.whl"
    assert wheel in install and "python -m monai.bundle run" in install
    assert all(pin in install for pin in pins if not pin.startswith("monai-diffseg")), pins
    assert "TorchScript export of the whole `network_def`" in card and "scripts/export.py" in card


@pytest.mark.slow
@pytest.mark.data
def test_recycling_bundle_segments_a_real_ct_in_a_fresh_environment(venv, wheel, tmp_path):
    root = standalone_bundle(venv, wheel, "recycling_ddpm_3d_segmentation", tmp_path)
    ct = nib.load(data_path("totalsegmentator/example_ct_sm.nii.gz")).slicer[CT_CROP]
    images = tmp_path / "images"
    images.mkdir()
    nib.save(ct, images / "patient_a.nii.gz")
    run_inference(venv, root, images, tmp_path / "out")

    out = nib.load(tmp_path / "out" / "patient_a_seg.nii.gz")
    seg = np.asarray(out.dataobj)
    assert seg.shape == ct.shape and np.allclose(out.affine, ct.affine, atol=1e-4)
    assert set(np.unique(seg).tolist()) <= set(range(8))
    liver_id = {name: idx for idx, name in totalseg_class_map("total").items()}["liver"]
    ref = np.asarray(nib.load(data_path("totalsegmentator/example_seg.nii.gz")).dataobj)[CT_CROP] == liver_id
    # patient A is the demo weights' training patient (measured liver Dice 0.87 on this crop): a check that the
    # shipped weights load and run unchanged outside the repository, not a generalisation figure
    assert dice(seg == 2, ref) > 0.6
    verify(venv, root)


@pytest.mark.slow
@pytest.mark.data
def test_segdiff_bundle_segments_real_nuclei_in_a_fresh_environment(venv, wheel, tmp_path):
    root = standalone_bundle(venv, wheel, "segdiff_2d_segmentation", tmp_path)
    image = tifffile.imread(data_path("stardist/img2d.tif"))[NUCLEI_CROP]
    mask = tifffile.imread(data_path("stardist/mask2d.tif"))[NUCLEI_CROP] > 0
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(image.astype(np.uint8)).save(images / "nuclei.png")
    few = ["--displayable_configs#num_inference_steps", "20", "--displayable_configs#num_samples", "2"]
    run_inference(venv, root, images, tmp_path / "out", *few)

    seg = np.asarray(nib.load(tmp_path / "out" / "nuclei_seg.nii.gz").dataobj).squeeze()
    std = np.asarray(nib.load(tmp_path / "out" / "nuclei_uncertainty.nii.gz").dataobj).squeeze()
    seg, std = (seg.T, std.T) if seg.shape != mask.shape else (seg, std)  # PNG readers store (x, y)
    assert seg.shape == std.shape == mask.shape and set(np.unique(seg).tolist()) <= {0, 1}
    assert np.isfinite(std).all() and std.min() >= 0 and std.max() > 0  # two samples disagree somewhere
    # the demo weights segment (model card: 0.854 on the whole held-out quarter with N = 9, T = 100); this 160×128
    # corner of it with N = 2, 20 steps measured 0.77 (the all-foreground mask: 0.3)
    assert dice(seg.astype(bool), mask) > 0.7
    verify(venv, root, "--displayable_configs#num_samples", "1", "--displayable_configs#num_inference_steps", "5")
