"""Training to a budget with MONAI's ``SupervisedTrainer``: a wall-clock budget with clean stops, resumable
checkpoints, an EMA of the weights, the random states an exact resume needs, and validation by wall time.

Wiring (every bundle's ``train.json``; ``TrainingClock`` first, so the timed handlers see this iteration's time)::

    "clock": {"_target_": "diffseg.TrainingClock", "max_minutes": "@max_minutes"},
    "ema": {"_target_": "diffseg.WeightEMA", "network": "<the trained module>", "decay": "@ema_decay",
            "validator": "@validate#evaluator"},
    "train#handlers": ["@clock",
        {"_target_": "diffseg.TrainingCheckpoint", "save_dir": "@ckpt_dir", "weights": "$@ema.shipped(@network)",
         "save_dict": {"model": ..., "optimizer": ..., "lr_scheduler": ..., "ema": "@ema", "clock": "@clock",
                       "rng": {"_target_": "diffseg.RandomStates", "transforms": "@train#preprocessing"}},
         "save_minutes": "@ckpt_minutes", "resume": "@resume", "clock": "@clock"},
        {"_target_": "diffseg.PeriodicValidation", "validator": ..., "interval": ..., "minutes": ..., "clock": ...},
        "@ema", ...]

Stopping: the budget (``max_minutes``), SIGTERM and Ctrl-C call ``engine.terminate()``; ignite then fires
``COMPLETED``, where the final checkpoint and the shipped weights are written. Under ``torchrun`` every stop decision
and every timer is taken on rank 0's clock and shared, so all ranks stop and validate at the same iteration.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.handlers import CheckpointLoader, ValidationHandler
from monai.transforms import Randomizable
from monai.utils import min_version, optional_import
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")
DiskSaver, _ = optional_import("ignite.handlers", "0.4.11", min_version, "DiskSaver")
idist, _ = optional_import("ignite.distributed", "0.4.11", min_version)

__all__ = ["PeriodicValidation", "RandomStates", "TrainingCheckpoint", "TrainingClock", "WeightEMA", "checkpoint_name"]

logger = logging.getLogger(__name__)


class TrainingClock:
    """Training wall time summed over resumed runs; stops the run when ``max_minutes`` is spent or on SIGTERM / SIGINT.

    ``seconds`` is the time of this run plus what earlier runs recorded (``state_dict``, saved in the training
    checkpoint); ``now`` is the value of the last completed iteration, shared by all ranks. A second Ctrl-C stops at
    once (``KeyboardInterrupt``).

    Args:
        max_minutes: the budget (None: no budget; ``max_epochs`` alone ends the run).
        handle_signals: install the SIGTERM / SIGINT handlers while the run lasts (main thread only).
    """

    def __init__(self, max_minutes: float | None = None, handle_signals: bool = True) -> None:
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes={max_minutes} must be > 0 (or null for no time budget)")
        self.max_minutes, self.handle_signals = max_minutes, handle_signals
        self._base, self._t0, self.now = 0.0, None, 0.0
        self._previous: dict[int, Any] = {}
        self.stop_reason: str | None = None

    @property
    def seconds(self) -> float:
        return self._base + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._base = self.now = float(state["seconds"])
        if self._t0 is not None:
            self._t0 = time.monotonic()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._tick)
        engine.add_event_handler(Events.COMPLETED, self._restore_signals)

    def _start(self, engine: Engine) -> None:
        self._t0, self.stop_reason = time.monotonic(), None
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, lambda signum, _frame: self._on_signal(engine, signum))

    def _on_signal(self, engine: Engine, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop_reason == name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_reason = name
        engine.logger.warning(f"{name}: stopping after iteration {engine.state.iteration} (final checkpoint follows)")

    def _restore_signals(self, _engine: Engine | None = None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _tick(self, engine: Engine) -> None:
        """Once per iteration: rank 0's time and any rank's stop request, shared; terminate when due."""
        now, stop = self.seconds, self.stop_reason is not None
        if self.max_minutes is not None and now >= self.max_minutes * 60:
            stop = True
        if idist.get_world_size() > 1:
            mine = torch.tensor([now if idist.get_rank() == 0 else 0.0, float(stop)], device=idist.device())
            shared = idist.all_reduce(mine).cpu()
            now, stop = float(shared[0]), bool(shared[1] > 0)
        self.now = now
        if stop and not engine.should_terminate:
            if self.stop_reason is None:
                self.stop_reason = f"time budget of {self.max_minutes} min spent"
            engine.logger.info(f"Stopping at iteration {engine.state.iteration}: {self.stop_reason}")
            engine.terminate()

    def every(self, minutes: float) -> Callable[[Engine, int], bool]:
        """An ignite event filter that fires once every ``minutes`` of training time (of ``now``), counted from the end
        of the previous firing's handlers (a validation longer than ``minutes`` does not fire it again at once)."""
        if minutes <= 0:
            raise ValueError(f"minutes={minutes} must be > 0")
        mark: list[float | None] = [None]

        def _due(_engine: Engine, _event: int) -> bool:
            if mark[0] is None:  # first call, or the first after firing: the time the handler took is not counted
                mark[0] = self.now
            if self.now - mark[0] >= minutes * 60:
                mark[0] = None
                return True
            return False

        return _due


def _mt_state(state: tuple) -> dict[str, Any]:
    """A NumPy MT19937 state as tensors and numbers (loadable with ``weights_only=True``)."""
    return {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]), "gauss": [state[3], state[4]]}


def _np_state(state: dict[str, Any]) -> tuple:
    return "MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], int(state["gauss"][0]), state["gauss"][1]


class RandomStates:
    """The random generators a resumed run needs to continue exactly as an uninterrupted one: torch (CPU and CUDA),
    NumPy's and Python's global ones, and the ``RandomState`` of every MONAI ``Randomizable`` in ``transforms``
    (nested ones too, e.g. a dictionary transform's inner cropper). A ``state_dict`` object for the checkpoint.

    Args:
        transforms: the training transforms (a ``Compose`` or any object holding transforms), or None.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def randomizables(self) -> list[Randomizable]:
        """Every ``Randomizable`` reachable from ``transforms``, in a fixed order."""
        found, seen, stack = [], set(), [self.transforms]
        while stack:
            obj = stack.pop(0)
            if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
                continue
            seen.add(id(obj))
            if isinstance(obj, Randomizable):
                found.append(obj)
            if isinstance(obj, (list, tuple)):
                stack.extend(obj)
            elif type(obj).__module__.startswith(("monai.transforms", "scripts", "diffseg")) and hasattr(
                obj, "__dict__"
            ):
                stack.extend(v for k, v in vars(obj).items() if k != "R")
        return found

    def state_dict(self) -> dict[str, Any]:
        py = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _mt_state(np.random.get_state()),
            "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
            "transforms": [_mt_state(t.R.get_state()) for t in self.randomizables()],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_np_state(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        transforms = self.randomizables()
        if len(transforms) != len(state["transforms"]):
            raise ValueError(
                f"the checkpoint holds {len(state['transforms'])} transform random states, the training transforms "
                f"have {len(transforms)} random transforms: resume with the configuration that wrote it"
            )
        for t, s in zip(transforms, state["transforms"], strict=True):
            t.R.set_state(_np_state(s))


def checkpoint_name(weights_filename: str) -> str:
    """The training checkpoint beside the shipped weights: ``model.pt`` → ``model.checkpoint.pt``."""
    return f"{Path(weights_filename).stem}.checkpoint.pt"


class TrainingCheckpoint:
    """Resumable training: the full state (``save_dict`` + the trainer's iteration/epoch + the AMP ``GradScaler``)
    in ``<save_dir>/<name>.checkpoint.pt`` every ``save_minutes`` of training time and when the run ends (budget,
    signal, ``max_epochs``), and the shipped weights (``weights``: a plain ``{name: tensor}`` state_dict, EMA
    weights when EMA is on) in ``<save_dir>/<weights_filename>`` at the same moments. Files are replaced atomically
    (ignite ``DiskSaver(atomic=True)``, rank 0 only), so a killed run loses at most ``save_minutes``.

    With ``resume`` the newest training checkpoint in ``save_dir`` is loaded when the run starts (MONAI
    ``CheckpointLoader``, after any weight initialisation of the config's ``run`` list); without one the run starts
    fresh. Continue a run with the same command and ``--resume true``; raise ``max_epochs`` / ``max_minutes`` to
    train on.

    Args:
        save_dir: the folder (``ckpt_dir``).
        save_dict: objects with ``state_dict``/``load_state_dict`` (model, optimizer, lr_scheduler, ema, clock, rng).
        weights: the module (or ``WeightEMA.shipped`` view) whose state_dict is shipped; None: no weights file.
        weights_filename: its file name (``ckpt_name``, e.g. ``model.pt``).
        save_minutes: the period of training time between checkpoints (None: only at the end).
        resume: load the newest checkpoint of ``save_dir`` when the run starts.
        clock: the run's ``TrainingClock`` (required for ``save_minutes``).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        weights: Any = None,
        weights_filename: str = "model.pt",
        save_minutes: float | None = 10.0,
        resume: bool = False,
        clock: TrainingClock | None = None,
    ) -> None:
        if save_minutes is not None and clock is None:
            raise ValueError("save_minutes needs the run's TrainingClock (clock=...)")
        self.save_dir, self.save_dict, self.weights = str(save_dir), dict(save_dict), weights
        self.weights_filename, self.filename = weights_filename, checkpoint_name(weights_filename)
        self.save_minutes, self.resume, self.clock = save_minutes, resume, clock
        self.resumed_from: int | None = None  # the iteration a resumed run continued from

    @property
    def path(self) -> Path:
        return Path(self.save_dir) / self.filename

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        if getattr(engine, "scaler", None) is not None:
            self.save_dict["scaler"] = engine.scaler
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self._register_saves)

    def _register_saves(self, engine: Engine) -> None:
        """The saves go after every other handler of their event, whatever the handlers' order in the config: the
        periodic one after the iteration's EMA update and curve row (a run killed right after it loses nothing of
        that iteration), the end-of-run one after the final validation."""
        if self.save_minutes is not None and not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self.clock.every(self.save_minutes)), self)
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            engine.logger.info(f"resume: no training checkpoint {self.path} yet, starting a new run")
            return
        CheckpointLoader(str(self.path), self.save_dict, map_location="cpu")(engine)
        self.resumed_from = engine.state.iteration
        engine.logger.info(f"resume: continuing from iteration {engine.state.iteration} (epoch {engine.state.epoch})")

    def __call__(self, engine: Engine) -> None:
        saver = DiskSaver(self.save_dir, atomic=True, create_dir=True, require_empty=False)
        saver({k: v.state_dict() for k, v in self.save_dict.items()}, self.filename)
        if self.weights is not None:
            saver(self.weights.state_dict(), self.weights_filename)
        engine.logger.info(f"iteration {engine.state.iteration}: saved {self.path} and {self.weights_filename}")


class _ShippedWeights:
    """``state_dict()`` of a module with the EMA weights in place of the trained ones (a copy; the module keeps its
    live weights)."""

    def __init__(self, ema: WeightEMA, module: nn.Module) -> None:
        self.ema, self.module = ema, module

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.ema.swapped():
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


class WeightEMA:
    """An exponential moving average of the trained weights (``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``), updated after every optimiser step; validated (the ``validator`` runs with the
    EMA weights swapped in) and shipped (``shipped(module)``). ``decay=None`` turns it off: then nothing is copied
    and ``shipped`` is the live weights.

    The average is created when training starts (after the config's weight initialisation) and saved in the
    training checkpoint (``state_dict``).

    Args:
        network: the module the optimiser trains (the trainer's ``network``).
        decay: EMA decay per iteration (e.g. 0.999), or None.
        validator: an engine to run with the EMA weights (the ``ValidationHandler``'s evaluator).
        use_buffers: average buffers too (normalisation statistics).
    """

    def __init__(
        self, network: nn.Module, decay: float | None = None, validator: Engine | None = None, use_buffers: bool = True
    ) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in (0, 1), or null for no EMA")
        self.network, self.decay, self.validator, self.use_buffers = network, decay, validator, use_buffers
        self.averaged: AveragedModel | None = None
        self._swaps: list[Any] = []

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def _average(self) -> AveragedModel:
        if self.averaged is None:
            self.averaged = AveragedModel(
                self.network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=self.use_buffers
            )
        return self.averaged

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, lambda _: self._average())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._swap_in)
            self.validator.add_event_handler(Events.COMPLETED, self._swap_out)

    def update(self, _engine: Engine | None = None) -> None:
        self._average().update_parameters(self.network)

    def _tensors(self, module: nn.Module) -> list[torch.Tensor]:
        return list(module.parameters()) + (list(module.buffers()) if self.use_buffers else [])

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in ``network`` for the duration (no-op without EMA or before training)."""
        if self.averaged is None:
            yield
            return
        live = self._tensors(self.network)
        kept = [t.detach().clone() for t in live]
        with torch.no_grad():
            for t, avg in zip(live, self._tensors(self.averaged.module), strict=True):
                t.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, k in zip(live, kept, strict=True):
                    t.copy_(k)

    def _swap_in(self, _engine: Engine) -> None:
        ctx = self.swapped()
        ctx.__enter__()
        self._swaps.append(ctx)

    def _swap_out(self, _engine: Engine) -> None:
        if self._swaps:
            self._swaps.pop().__exit__(None, None, None)

    def shipped(self, module: nn.Module | None = None) -> _ShippedWeights:
        """A ``state_dict`` view of ``module`` (default: ``network``; may contain it) with the EMA weights."""
        return _ShippedWeights(self, self.network if module is None else module)

    def state_dict(self) -> dict[str, Any]:
        return self._average().state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self._average().load_state_dict(state)


class PeriodicValidation(ValidationHandler):
    """MONAI's ``ValidationHandler`` every ``interval`` epochs and/or every ``minutes`` of training time, and once
    more when the run ends (unless it just ran): the last row of a learning curve is the final model. The global
    random generators are restored after each validation, so how often a run validates does not change its training.
    An empty validation list (e.g. MONAI Label's ``val_split`` 0) skips validation.

    Args:
        validator: the evaluator.
        interval: epochs between validations (≤ 0: none by epoch).
        minutes: training time between validations (None: none by time).
        clock: the run's ``TrainingClock`` (required for ``minutes``).
        at_end: validate when the run ends.
    """

    def __init__(
        self,
        validator: Engine,
        interval: int = 0,
        minutes: float | None = None,
        clock: TrainingClock | None = None,
        at_end: bool = True,
    ) -> None:
        if minutes is not None and clock is None:
            raise ValueError("minutes needs the run's TrainingClock (clock=...)")
        super().__init__(interval=max(int(interval), 1), validator=validator, epoch_level=True)
        self.epochs, self.minutes, self.clock, self.at_end = int(interval), minutes, clock, at_end
        self._last: int | None = None

    def attach(self, engine: Engine) -> None:
        if self.epochs > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.epochs), self)
        if self.minutes is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self.clock.every(self.minutes)), self)
        if self.at_end:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self._last == engine.state.iteration:
            return
        self._last = engine.state.iteration
        loader = getattr(self.validator, "data_loader", None)
        if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
            engine.logger.info("validation skipped: the validation data list is empty")
            return
        generators = RandomStates()
        state = generators.state_dict()
        try:
            super().__call__(engine)
        finally:  # validation never consumes the training's random numbers
            generators.load_state_dict(state)
