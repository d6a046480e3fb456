"""How 3D inference scales with the volume (recycling DDPM, shipped weights, 5 steps, 1 sample, its own inferer).

- ``volume_scaling_r2``: R² of a linear fit of seconds vs voxel count over 4 sizes. Goal ≥ 0.98.
- ``peak_rss_growth``: peak resident memory of the 8× volume ÷ that of the smallest. Goal ≤ 3.

Each size runs in a fresh Python process, so its peak RSS is its own (imports included); seconds are the median
of the child's timed runs of the inferer (model building excluded).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import Figure, figure

SIZES_QUICK = [(64, 64, 16), (96, 96, 16), (128, 128, 16), (128, 128, 32)]  # the last is 8× the first
SIZES_FULL = [(96, 96, 32), (128, 128, 32), (160, 160, 48), (192, 192, 64)]


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ``ru_maxrss`` it is not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best available


def child(shape: list[int], repeats: int) -> None:
    """Run in a subprocess: print {"seconds": median, "peak_rss_mb": …} for one volume of ``shape``."""
    import torch

    from benchmarks.recycling import BUNDLE, _parsed

    torch.set_num_threads(int(sys.argv[-1]))
    segmenter, inferer = _parsed("network_def", "inferer")
    segmenter.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
    image = torch.rand(1, 1, *shape)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        inferer(image, segmenter)
        runs.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(runs), "runs": runs, "peak_rss_mb": _peak_rss_mb()}))


def _measure(shape: tuple[int, ...], repeats: int) -> dict:
    import torch

    here = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent / 'common')!r}]; "
        f"from benchmarks.scaling import child; child({list(shape)}, {repeats})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(torch.get_num_threads())], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@figure("scaling")
def scaling_figures(quick: bool) -> list[Figure]:
    sizes = SIZES_QUICK if quick else SIZES_FULL
    results = [_measure(s, 1 if quick else 3) for s in sizes]
    voxels = np.array([float(np.prod(s)) for s in sizes])
    seconds = np.array([r["seconds"] for r in results])
    slope, intercept = np.polyfit(voxels, seconds, 1)
    residual = seconds - (slope * voxels + intercept)
    r2 = 1.0 - float((residual**2).sum() / ((seconds - seconds.mean()) ** 2).sum())
    spreads = [(max(r["runs"]) - min(r["runs"])) / r["seconds"] for r in results]
    details = {
        "sizes": [list(s) for s in sizes],
        "seconds": seconds.tolist(),
        "peak_rss_mb": [r["peak_rss_mb"] for r in results],
        "us_per_voxel": (seconds / voxels * 1e6).tolist(),
    }
    growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    return [
        Figure("volume_scaling_r2", r2, "R2", ">= 0.98", r2 >= 0.98, max(spreads), details),
        Figure("peak_rss_growth", growth, "x", "<= 3", growth <= 3.0, 0.0, details),
    ]
