"""Training to a budget: exact resume, time budget, signals, EMA, random states, LR schedule, learning curves.

A tiny MONAI ``SupervisedTrainer`` (a 2-layer conv net on 12×12 images with random crops, flips, MONAI noise and
torch noise in the batch preparation) runs in well under a second per test.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, from_engine
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose, RandFlipd, RandGaussianNoised, RandSpatialCropd
from monai.utils import set_determinism

from diffseg import (
    LearningCurve,
    PeriodicValidation,
    RandomStates,
    TrainingCheckpoint,
    TrainingClock,
    WarmupCosineSchedule,
    WeightEMA,
)
from diffseg.curves import curve_summary, read_curve

EPOCH = 2  # iterations per epoch: 4 images, batch 2


def _data(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.RandomState(seed)
    items = []
    for _ in range(n):
        image = rng.rand(1, 12, 12).astype(np.float32)
        items.append({"image": image, "label": (image > 0.5).astype(np.float32)})
    return items


def _noisy_batch(batch, device=None, non_blocking=False, **kwargs):
    """default_prepare_batch plus torch-RNG noise (the global generator must be restored on resume)."""
    image = batch["image"].to(device)
    return image + 0.1 * torch.randn_like(image), batch["label"].to(device)


def make_run(out: Path, max_epochs: int, **opts) -> tuple[SupervisedTrainer, dict]:
    """A trainer wired like the bundles' train.json; ``opts``: ema_decay, resume, max_minutes, ckpt_minutes,
    val_interval, handle_signals."""
    set_determinism(seed=0)
    transforms = Compose(
        [
            RandSpatialCropd(keys=["image", "label"], roi_size=(8, 8), random_size=False),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandGaussianNoised(keys="image", prob=0.5, std=0.05),
        ]
    )
    loader = DataLoader(CacheDataset(_data(4, 0), transforms, progress=False), batch_size=2, shuffle=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scheduler = WarmupCosineSchedule(optimizer, 2, max_epochs * EPOCH, end_lr=1e-4, warmup_multiplier=0.1)
    validator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(_data(2, 1), batch_size=1),
        network=net,
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric={
            "val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
    )
    clock = TrainingClock(opts.get("max_minutes"), handle_signals=opts.get("handle_signals", True))
    ema = WeightEMA(net, opts.get("ema_decay", 0.9), validator=validator)
    rng = RandomStates(transforms)
    save = {"model": net, "optimizer": optimizer, "lr_scheduler": scheduler, "ema": ema, "clock": clock, "rng": rng}
    ckpt = TrainingCheckpoint(
        str(out),
        save,
        weights=ema.shipped(),
        save_minutes=opts.get("ckpt_minutes"),
        resume=opts.get("resume", False),
        clock=clock,
    )
    validation = PeriodicValidation(validator, interval=opts.get("val_interval", 1), clock=clock)
    curve = LearningCurve(str(out / "curve"), clock, validator, class_names=["fg"], log_interval=1)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=net,
        optimizer=optimizer,
        loss_function=DiceCELoss(softmax=True, to_onehot_y=True),
        prepare_batch=_noisy_batch,
        train_handlers=[
            clock,
            LrScheduleHandler(scheduler, epoch_level=False, print_lr=False),
            ckpt,
            validation,
            ema,
            curve,
        ],
    )
    return trainer, {"net": net, "ema": ema, "clock": clock, "ckpt": ckpt, "curve": curve, "validator": validator}


def _send_sigterm_at(trainer: SupervisedTrainer, iteration: int) -> None:
    """A real SIGTERM to this process while ``iteration`` runs."""
    trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration), lambda _: os.kill(os.getpid(), signal.SIGTERM))


def test_sigterm_then_resume_gives_the_weights_and_lrs_of_one_run(tmp_path):
    k = 2 * EPOCH
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    trainer, _ = make_run(whole, max_epochs=4)
    trainer.run()
    assert trainer.state.iteration == 2 * k

    first, run1 = make_run(parts, max_epochs=4)
    _send_sigterm_at(first, k)
    first.run()
    assert first.state.iteration == k and run1["clock"].stop_reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    second, run2 = make_run(parts, max_epochs=4, resume=True)
    second.run()
    assert run2["ckpt"].resumed_from == k and second.state.iteration == 2 * k

    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, parts))
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    live_a, live_b = (torch.load(d / "model.checkpoint.pt", weights_only=True)["model"] for d in (whole, parts))
    assert max((live_a[n] - live_b[n]).abs().max().item() for n in live_a) < 1e-6

    def lrs(d: Path) -> dict[int, float]:
        return {int(r["iteration"]): r["lr"] for r in read_curve(d / "curve" / "curve.csv") if "loss" in r}

    assert sorted(lrs(parts)) == list(range(1, 2 * k + 1))
    assert lrs(parts) == pytest.approx(lrs(whole), rel=0, abs=1e-12)


def test_shipped_weights_are_the_ema_and_a_plain_state_dict(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=2, ema_decay=0.5)
    trainer.run()
    shipped = torch.load(tmp_path / "model.pt", weights_only=True)
    live = run["net"].state_dict()
    assert set(shipped) == set(live) and all(isinstance(v, torch.Tensor) for v in shipped.values())
    average = run["ema"].averaged.module.state_dict()
    assert all(torch.equal(shipped[n], average[n]) for n in shipped)
    assert any(not torch.equal(shipped[n], live[n]) for n in shipped)  # EMA ≠ live weights after 4 steps
    state = torch.load(tmp_path / "model.checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "ema", "clock", "rng", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2 * EPOCH


def test_ema_is_the_exponential_average_and_validation_sees_it(tmp_path):
    net = nn.Linear(2, 1, bias=False)
    ema = WeightEMA(net, decay=0.75)
    expected = None
    for step in range(4):
        with torch.no_grad():
            net.weight.fill_(float(step + 1))
        ema.update()
        w = float(step + 1)
        expected = w if expected is None else 0.75 * expected + 0.25 * w
    assert ema.averaged.module.weight.detach() == pytest.approx(torch.full((1, 2), expected))
    with ema.swapped():
        assert torch.allclose(net.weight, torch.full((1, 2), expected))
    assert torch.equal(net.weight.detach(), torch.full((1, 2), 4.0))  # live weights back
    off = WeightEMA(net, decay=None)
    assert off.averaged is None and off.state_dict() == {}
    assert torch.equal(off.shipped().state_dict()["weight"], net.weight)
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        WeightEMA(net, decay=1.5)


def test_validation_runs_on_ema_weights_and_training_continues_on_live_ones(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=2, ema_decay=0.5)
    seen = []
    run["validator"].add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: seen.append(run["net"][0].weight.detach().clone())
    )
    trainer.run()
    final_average = run["ema"].averaged.module[0].weight
    assert torch.equal(seen[-1], final_average) and not torch.equal(run["net"][0].weight, final_average)


def test_an_empty_validation_list_skips_validation(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=1)
    run["validator"].data_loader = DataLoader([], batch_size=1)
    runs = []
    run["validator"].add_event_handler(Events.STARTED, lambda _: runs.append(1))
    trainer.run()
    assert trainer.state.iteration == EPOCH and runs == []


def test_time_budget_stops_cleanly_with_a_final_checkpoint(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=1000, max_minutes=0.5 / 60)
    trainer.run()
    assert 0 < trainer.state.iteration < 1000 * EPOCH
    assert run["clock"].stop_reason.startswith("time budget")
    state = torch.load(tmp_path / "model.checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == trainer.state.iteration and state["clock"]["seconds"] >= 0.5
    # the budget is cumulative: a resumed run with the same budget stops after its first iteration
    again, _ = make_run(tmp_path, max_epochs=1000, max_minutes=0.5 / 60, resume=True)
    again.run()
    assert again.state.iteration == trainer.state.iteration + 1


def test_periodic_checkpoints_follow_the_training_clock(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=8, ckpt_minutes=0.01 / 60, val_interval=0)
    saved = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: saved.append(run["ckpt"].path.stat().st_mtime_ns) if run["ckpt"].path.exists() else None,
    )
    trainer.run()
    assert saved and len(set(saved)) >= 2  # rewritten during the run, not only at the end


def test_random_states_round_trip():
    transform = RandFlipd(keys="image", prob=0.5)
    states = RandomStates(Compose([transform]))
    torch.manual_seed(3)
    state = states.state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random(), transform.R.rand(3))
    torch.rand(5), np.random.rand(5), random.random(), transform.R.rand(5)
    states.load_state_dict(state)
    second = (torch.rand(3), np.random.rand(3), random.random(), transform.R.rand(3))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and np.array_equal(first[3], second[3])
    assert transform in states.randomizables()
    with pytest.raises(ValueError, match="have 2 random transforms"):
        RandomStates(Compose([transform])).load_state_dict({**state, "transforms": []})


def test_warmup_cosine_never_rises_after_t_total():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=10, t_total=100, end_lr=1e-6, warmup_multiplier=0.01)
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[10] == pytest.approx(1e-3)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-9) and lrs[100] == lrs[-1]


def test_learning_curve_rows_columns_picture_and_resume(tmp_path):
    trainer, run = make_run(tmp_path, max_epochs=3)
    _send_sigterm_at(trainer, 3)
    trainer.run()
    rows = read_curve(tmp_path / "curve" / "curve.csv")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_mean_dice" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3]
    assert all({"wall_seconds", "epoch", "lr"} <= set(r) and math.isfinite(r["loss"]) for r in train_rows)
    assert [r["iteration"] for r in val_rows] == [2, 3]  # epoch 1, then the stop
    assert all(r["val_dice_fg"] == pytest.approx(r["val_mean_dice"]) for r in val_rows)
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000
    resumed, _ = make_run(tmp_path, max_epochs=3, resume=True)
    resumed.run()
    rows = read_curve(tmp_path / "curve" / "curve.csv")
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    walls = [r["wall_seconds"] for r in rows]
    assert walls == sorted(walls)  # the clock continues across the resume
    summary = curve_summary(rows)
    assert summary["final_iteration"] == 6 and summary["best"] >= summary["final"] - 1e-12


def test_handlers_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="max_minutes=0"):
        TrainingClock(0)
    with pytest.raises(ValueError, match="TrainingClock"):
        TrainingCheckpoint("/tmp", {}, save_minutes=5)
    with pytest.raises(ValueError, match="TrainingClock"):
        PeriodicValidation(None, minutes=5)


def test_every_counts_minutes_from_the_end_of_the_previous_firing():
    """A validation longer than its interval does not fire again at the next iteration (time spent by the handler
    is not counted towards the next interval)."""
    clock = TrainingClock()
    due = clock.every(1.0)
    fired = []
    for now in (0.0, 30.0, 61.0, 200.0, 230.0, 262.0):  # the handler fired at 61 s ran until 200 s
        clock.now = now
        fired.append(due(None, 0))
    assert fired == [False, False, True, False, False, True]


def test_a_periodic_checkpoint_holds_its_iteration_entirely_and_resumes_as_one_run(tmp_path, monkeypatch):
    """The periodic save runs after the iteration's other handlers (EMA update, curve row) whatever their order in
    the config: a run killed right after it loses nothing, and resuming from it gives the weights of one run."""
    whole, periodic, killed = tmp_path / "whole", tmp_path / "periodic", tmp_path / "killed"
    trainer, _ = make_run(whole, max_epochs=4, val_interval=0)
    trainer.run()

    save = TrainingCheckpoint.__call__

    def save_and_snapshot(self, engine):  # a copy of the files as a SIGKILL right after this save would leave them
        save(self, engine)
        if engine.state.iteration == 2 * EPOCH and not killed.exists():
            shutil.copytree(periodic, killed)

    monkeypatch.setattr(TrainingCheckpoint, "__call__", save_and_snapshot)
    trainer, _ = make_run(periodic, max_epochs=4, ckpt_minutes=1e-9, val_interval=0)
    trainer.run()
    monkeypatch.undo()
    assert killed.is_dir()
    state = torch.load(killed / "model.checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * EPOCH and int(state["ema"]["n_averaged"]) == 2 * EPOCH
    assert [r["iteration"] for r in read_curve(killed / "curve" / "curve.csv") if "loss" in r] == [1, 2, 3, 4]

    resumed, _ = make_run(killed, max_epochs=4, resume=True, val_interval=0)
    resumed.run()
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, killed))
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    rows = read_curve(killed / "curve" / "curve.csv")
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(1, 4 * EPOCH + 1))
