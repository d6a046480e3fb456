"""What every bundle's training configs promise (issue 15): LR schedules that end at ``end_lr`` and never rise after
the warmup, and a real ``python -m monai.bundle run`` training that survives ``kill -9`` and SIGTERM and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_testing import BUNDLES, REPO, bundle_imports, load_config, run_bundle
from PIL import Image

from diffseg.curves import read_curve

SCHEDULED = [
    ("recycling_ddpm_3d_segmentation", ("train.json",)),
    ("recycling_ddpm_3d_segmentation", ("train.json", "paper.json")),
    ("recycling_ddpm_3d_segmentation", ("train.json", "train_demo.json")),
    ("segdiff_2d_segmentation", ("train.json",)),
    ("segdiff_2d_segmentation", ("train.json", "train_demo.json")),
    ("sdseg_latent_segmentation", ("train.json",)),
    ("sdseg_latent_segmentation", ("train.json", "train_demo.json")),
    ("diffusion_probe_3d_segmentation", ("train.json",)),
    ("diffusion_probe_3d_segmentation", ("train.json", "paper.json")),
    ("diffusion_probe_3d_segmentation", ("train.json", "train_demo.json")),
]
DUMMY_OPTIMIZER = {
    "_target_": "torch.optim.SGD",
    "params": "$[torch.nn.Parameter(torch.zeros(1))]",
    "lr": "@learning_rate",
}


@pytest.mark.parametrize("bundle, configs", SCHEDULED, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_lr_schedule_ends_at_end_lr_and_never_rises_after_warmup(bundle, configs):
    parser = load_config(bundle, configs, iterations_per_epoch=1, optimizer=DUMMY_OPTIMIZER)
    with bundle_imports(bundle):
        schedule = parser.get_parsed_content("lr_scheduler")
        run_length = parser.get_parsed_content("max_epochs") * parser.get_parsed_content("iterations_per_epoch")
        peak, end_lr = parser.get_parsed_content("learning_rate"), parser.get_parsed_content("end_lr")
    optimizer = schedule.optimizer
    lrs = []
    for _ in range(run_length):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    after_warmup = lrs[schedule.warmup_steps :]
    assert max(lrs) <= peak * (1 + 1e-12)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(end_lr, rel=1e-9)  # the LR the run ends with
    assert schedule.t_total <= run_length


# --- a real training process: SegDiff with a network of a few thousand parameters on 5 tiny PNG images ----------

BUNDLE = "segdiff_2d_segmentation"
TINY = {
    "unet_channels": [8, 8],
    "attention_levels": [False, False],
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "rrdb_blocks": 1,
    "rrdb_features": 8,
    "rrdb_growth": 4,
    "roi_size": [16, 16],
    "patch_size": [16, 16],
    "batch_size": 2,
    "crops_per_image": 1,
    "num_inference_steps": 2,
    "num_samples": 1,
    "val_interval": 0,
    "ema_decay": 0.9,
    "curve_log_interval": 1,
}
PER_EPOCH = 2  # 4 training images, batch 2


@pytest.fixture
def run_dirs(tmp_path) -> dict:
    rng = np.random.RandomState(0)
    items = []
    for i in range(5):
        image = (rng.rand(24, 24) * 255).astype(np.uint8)
        for kind, arr in (("image", image), ("label", (image > 128).astype(np.uint8) * 255)):
            (tmp_path / kind).mkdir(exist_ok=True)
            Image.fromarray(arr).save(tmp_path / kind / f"{i}.png")
        items.append({"image": f"image/{i}.png", "label": f"label/{i}.png"})
    (tmp_path / "dataset.json").write_text(json.dumps({"training": items[:4], "validation": items[4:]}))
    return {"dataset_dir": str(tmp_path), "ckpt_dir": str(tmp_path / "ckpt"), "output_dir": str(tmp_path / "out")}


def _start(overrides: dict, log: Path) -> subprocess.Popen:
    """``python -m monai.bundle run`` of SegDiff's train.json in a new process, its output in ``log``."""
    root = BUNDLES / BUNDLE
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "train.json")]
    cmd += ["--bundle_root", str(root), "--meta_file", str(root / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value)]  # fire reads Python literals
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "common"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _iteration(path: Path) -> int:
    return torch.load(path, weights_only=True)["trainer"]["iteration"]


def _wait(proc: subprocess.Popen, log: Path, done, what: str, timeout: float = 240) -> None:
    """Poll until ``done()``; fail with the run's output when the process ends first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        if done():
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{what} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_periodic_checkpoint_and_sigterm_saves(run_dirs):
    ckpt = Path(run_dirs["ckpt_dir"]) / "model.checkpoint.pt"
    args = {**TINY, **run_dirs, "epochs": 100000, "ckpt_minutes": 0.2 / 60}

    log = Path(run_dirs["output_dir"]).parent / "run.log"
    proc = _start(args, log)
    _wait(proc, log, lambda: ckpt.exists() and _iteration(ckpt) > 2, "no periodic checkpoint past iteration 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _iteration(ckpt)  # the last periodic checkpoint before the kill
    assert (Path(run_dirs["ckpt_dir"]) / "model.pt").exists()

    # the resumed run saves only when it ends: SIGTERM must stop it cleanly and write that final checkpoint
    proc = _start({**args, "resume": True, "ckpt_minutes": None}, log)
    resumed = f"resume: continuing from iteration {killed_at}"
    _wait(proc, log, lambda: resumed in log.read_text(), f"no {resumed!r}")
    _wait(proc, log, lambda: log.read_text().count("train_loss") >= 3, "no training iterations after resuming")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "SIGTERM: stopping after iteration" in log.read_text()
    stopped_at = _iteration(ckpt)
    assert stopped_at > killed_at

    epochs = stopped_at // PER_EPOCH + 2
    run_bundle(BUNDLE, ("train.json",), **{**args, "epochs": epochs, "resume": True})
    assert _iteration(ckpt) == epochs * PER_EPOCH
    rows = [r for r in read_curve(Path(run_dirs["output_dir"]) / "curve.csv") if "loss" in r]
    iterations = [int(r["iteration"]) for r in rows]
    assert iterations == sorted(set(iterations)) and iterations[-1] == epochs * PER_EPOCH
    assert set(range(1, killed_at + 1)) <= set(iterations)  # rows up to the resumed checkpoint are kept
    shipped = torch.load(Path(run_dirs["ckpt_dir"]) / "model.pt", weights_only=True)
    assert all(k.startswith("denoiser.") for k in shipped)  # the plain state_dict of network_def
