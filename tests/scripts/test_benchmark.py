"""scripts/benchmark.py: the SegDiff figures build the bundle's shipped network and return both ratios (no timing is
asserted: benchmarks measure, tests check that they still run on the current network)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import benchmark  # noqa: E402


def test_segdiff_quick_figures_run_on_the_shipped_network(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(quick=True, only="segdiff", output=str(out))
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert sorted(figures) == ["ensemble_batch_speedup", "segdiff_cache_speedup"]
    for figure in figures.values():
        assert figure["value"] > 0 and figure["details"]["samples"] == 9 and figure["details"]["image"] == "128x128"
