"""Benchmark registry: each module here registers figures with :func:`figure`; ``scripts/benchmark.py`` runs them.

A figure function takes ``quick: bool`` and returns a :class:`Figure` built with :func:`timed` (median + spread of
repeated runs). Ratios are measured side by side in one process, never against numbers from another run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = ["FIGURES", "Figure", "Timing", "figure", "ratio", "timed"]


@dataclass
class Timing:
    """Seconds of repeated runs of one callable."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median of the runs."""
        return (max(self.runs) - min(self.runs)) / self.median if self.median else 0.0


@dataclass
class Figure:
    """One reported figure: ``value`` (median), ``spread``, the ``goal`` text and the raw timings behind it."""

    name: str
    value: float
    unit: str
    goal: str = ""
    met: bool | None = None
    spread: float = 0.0
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


FIGURES: dict[str, Callable[[bool], list[Figure]]] = {}


def figure(name: str) -> Callable:
    """Register a benchmark function ``fn(quick) -> list[Figure]`` under ``name`` (the ``--only`` key)."""

    def register(fn: Callable[[bool], list[Figure]]) -> Callable[[bool], list[Figure]]:
        if name in FIGURES:
            raise ValueError(f"benchmark {name!r} registered twice")
        FIGURES[name] = fn
        return fn

    return register


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed with ``time.perf_counter``."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return Timing(runs)


def ratio(name: str, slow: Timing, fast: Timing, goal: float, higher_is_better: bool = True, **details) -> Figure:
    """``slow.median / fast.median`` with the pairwise spread of the ratio over runs and whether ``goal`` is met."""
    value = slow.median / fast.median
    pairs = [s / f for s, f in zip(slow.runs, fast.runs, strict=False)]
    spread = (max(pairs) - min(pairs)) / value if pairs else 0.0
    met = value >= goal if higher_is_better else value <= goal
    details = {"slow_s": slow.runs, "fast_s": fast.runs, **details}
    return Figure(name, value, "x", f"{'>=' if higher_is_better else '<='} {goal}", met, spread, details)
