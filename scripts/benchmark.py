"""Benchmarks of MONAI DiffSeg: ratios measured side by side in one run, printed as a table and written as JSON.

    python scripts/benchmark.py                     # every figure
    python scripts/benchmark.py --quick             # smaller inputs and fewer repeats (a few minutes on 2 cores)
    python scripts/benchmark.py --only segdiff --output bench.json

Figures are registered by the modules in ``scripts/benchmarks/`` (one per bundle or topic).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

import benchmarks  # noqa: E402


def _load_all() -> None:
    for info in pkgutil.iter_modules(benchmarks.__path__):
        importlib.import_module(f"benchmarks.{info.name}")


def main(quick: bool = False, only: str | tuple[str, ...] | None = None, output: str | None = None, threads: int = 2):
    """Run the registered benchmarks (``only``: comma-separated names) and print a table; ``output``: JSON path."""
    _load_all()
    torch.set_num_threads(threads)
    names = list(benchmarks.FIGURES) if only is None else [only] if isinstance(only, str) else list(only)
    names = [n for part in names for n in str(part).split(",") if n]
    unknown = sorted(set(names) - set(benchmarks.FIGURES))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {sorted(benchmarks.FIGURES)}")
    figures = []
    for name in names:
        start = time.perf_counter()
        figures += benchmarks.FIGURES[name](quick)
        print(f"[{name}] {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"{'figure':<32} {'value':>10} {'unit':<5} {'spread':>7}  {'goal':<8} met")
    for f in figures:
        met = "-" if f.met is None else "yes" if f.met else "NO"
        print(f"{f.name:<32} {f.value:>10.3f} {f.unit:<5} {f.spread:>6.1%}  {f.goal:<8} {met}")
    if output:
        machine = {"machine": platform.machine(), "processor": platform.processor(), "threads": threads}
        report = {"date": time.strftime("%Y-%m-%d"), "quick": quick, **machine, "torch": torch.__version__}
        Path(output).write_text(json.dumps({**report, "figures": [f.as_dict() for f in figures]}, indent=4) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
