"""Learning curves as files and pictures: ``<output_dir>/curve.csv`` and ``curve.png`` written during training by
the :class:`LearningCurve` handler, and several runs drawn in one figure (``scripts/analyze.py curves``).

``curve.csv`` has one row per logged iteration (``wall_seconds, iteration, epoch, loss, loss_<term>…, lr``) and one
per validation (``wall_seconds, iteration, epoch, lr, val_mean_dice, val_dice_<class>…``); empty cells where a row has
no value. ``wall_seconds`` is the training clock (summed over resumed runs). Rows are appended as they come (a killed
run keeps them); a resumed run keeps the rows up to the iteration it continues from.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import min_version, optional_import

from diffseg.handlers import TrainingClock

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["LearningCurve", "curve_summary", "plot_curves", "read_curve"]

FIXED = ["wall_seconds", "iteration", "epoch", "loss"]


def read_curve(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a ``curve.csv``; empty cells are left out of each row's mapping, and a row cut short by a killed
    run is dropped."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None) and k is not None})
            except ValueError:
                continue
    return rows


def _columns(rows: Sequence[Mapping[str, float]]) -> list[str]:
    """The fixed columns first, then the others in order of appearance."""
    columns = [c for c in FIXED if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _write_rows(path: Path, rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> None:
    """Atomically rewrite ``path`` with ``rows``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(wall minutes, values) of the rows that have ``key``."""
    pairs = [(r["wall_seconds"] / 60, r[key]) for r in rows if key in r and not math.isnan(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]], output: str | os.PathLike, metric: str = "val_mean_dice"
) -> None:
    """Loss (top, log scale) and ``metric`` (bottom) against wall minutes, one line per run; PNG at ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, rows in runs.items():
        minutes, loss = _series(rows, "loss")
        if loss:
            ax_loss.plot(minutes, loss, lw=0.8, label=label)
        minutes, values = _series(rows, metric)
        if values:
            ax_metric.plot(minutes, values, marker="o", ms=3, label=label)
    if ax_loss.lines:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    ax_metric.set_ylabel(metric.replace("_", " "))
    ax_metric.set_xlabel("training wall time (minutes)")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def curve_summary(rows: Sequence[Mapping[str, float]], metric: str = "val_mean_dice") -> dict[str, float]:
    """Best and final ``metric`` of a run with their wall minutes (NaN without validations), its iterations and
    training seconds per iteration (validation included)."""
    nan = float("nan")
    last = max(rows, key=lambda r: (r.get("iteration", 0), r["wall_seconds"]), default=None)
    iterations = last["iteration"] if last else nan
    summary = {
        "best": nan,
        "best_minutes": nan,
        "final": nan,
        "final_minutes": nan,
        "final_iteration": iterations,
        "seconds_per_iteration": last["wall_seconds"] / iterations if last and iterations else nan,
    }
    validated = [r for r in rows if metric in r]
    if validated:
        best = max(validated, key=lambda r: r[metric])
        summary.update(best=best[metric], best_minutes=best["wall_seconds"] / 60)
        summary.update(final=validated[-1][metric], final_minutes=validated[-1]["wall_seconds"] / 60)
    return summary


class LearningCurve:
    """Writes ``curve.csv`` during training and redraws ``curve.png`` at every validation.

    Training rows every ``log_interval`` iterations: the loss, the terms of ``loss_function.last_terms`` when the
    loss records them, and the learning rate the iteration used. Validation rows: the validator's ``metric_name``
    and, from its per-image details (MONAI ``MeanDice(save_details=True)``), the mean Dice of every class.

    Args:
        output_dir: where ``curve.csv`` / ``curve.png`` go (created).
        clock: the run's ``TrainingClock`` (the wall-seconds column).
        validator: the evaluator whose completions add validation rows (None: training rows only).
        metric_name: the validator's key metric.
        class_names: names of the foreground classes for the per-class columns (default ``1, 2, …``).
        log_interval: iterations between training rows.
    """

    def __init__(
        self,
        output_dir: str,
        clock: TrainingClock,
        validator: Engine | None = None,
        metric_name: str = "val_mean_dice",
        class_names: Sequence[str] | None = None,
        log_interval: int = 10,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval={log_interval} must be ≥ 1")
        self.dir, self.clock, self.validator, self.metric_name = Path(output_dir), clock, validator, metric_name
        self.class_names, self.log_interval = class_names, log_interval
        self.csv_path, self.png_path = self.dir / "curve.csv", self.dir / "curve.png"
        self.rows: list[dict[str, float]] = []
        self._trainer: Engine | None = None
        self._lr = float("nan")
        self._written: tuple[list[str], int] = ([], 0)  # (columns, rows) in the file
        self._started = False

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_interval), self._log_iteration)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write(plot=True))
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._log_validation)

    def _begin(self) -> None:
        """Once per run, after any resume: keep the earlier rows up to the iteration this run continues from."""
        if self._started:
            return
        self._started = True
        self.dir.mkdir(parents=True, exist_ok=True)
        start = self._trainer.state.iteration - 1  # ITERATION_STARTED has counted this iteration already
        if start > 0 and self.csv_path.is_file():
            self.rows = [r for r in read_curve(self.csv_path) if r.get("iteration", 0) <= start]

    def _iteration_started(self, engine: Engine) -> None:
        self._begin()
        self._lr = float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else self._lr

    def _row(self) -> dict[str, float]:
        state = self._trainer.state
        return {"wall_seconds": round(self.clock.seconds, 3), "iteration": state.iteration, "epoch": state.epoch}

    def _log_iteration(self, engine: Engine) -> None:
        row = self._row()
        output = engine.state.output
        output = output[0] if isinstance(output, (list, tuple)) else output
        loss = output["loss"] if isinstance(output, Mapping) else output
        row["loss"] = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        for name, value in (getattr(engine.loss_function, "last_terms", None) or {}).items():
            row[f"loss_{name}"] = float(value)
        row["lr"] = self._lr
        self.rows.append(row)
        self.write()

    def _log_validation(self, validator: Engine) -> None:
        if self._trainer is None or self._trainer.state.iteration == 0:
            return  # a validation run outside training
        self._started = True
        row = self._row()
        row["lr"] = self._lr
        row[self.metric_name] = float(validator.state.metrics[self.metric_name])
        details = getattr(validator.state, "metric_details", {}).get(self.metric_name)
        if details is not None:
            per_class = torch.as_tensor(details, dtype=torch.float64).reshape(-1, torch.as_tensor(details).shape[-1])
            names = self.class_names or [str(i + 1) for i in range(per_class.shape[-1])]
            for name, value in zip(names, per_class.nanmean(0).tolist(), strict=False):
                row[f"val_dice_{name}"] = value
        self.rows.append(row)
        self.write(plot=True)

    def write(self, plot: bool = False) -> None:
        """Bring ``curve.csv`` up to date: new rows are appended while the columns stay the same, the file is
        rewritten atomically when a column appears; ``plot`` redraws ``curve.png``."""
        if not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        columns = _columns(self.rows)
        written_columns, written_rows = self._written
        if columns == written_columns and self.csv_path.is_file():
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerows(self.rows[written_rows:])
        else:
            _write_rows(self.csv_path, self.rows, columns)
        self._written = (columns, len(self.rows))
        if plot:
            plot_curves({self.dir.name or "run": self.rows}, self.png_path, self.metric_name)

    def summary(self) -> dict[str, Any]:
        return curve_summary(self.rows, self.metric_name)
