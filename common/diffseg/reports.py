"""Per-case reports of the folder CLI: per-structure statistics and the ensemble's review flag.

:func:`structure_statistics` measures every class of a label map in the input's geometry: voxel count, volume (ml;
area in mm² for 2D images), mean and std of the input intensity inside the structure (as the reader returns it, i.e.
HU for CT after the rescale slope/intercept) and, for diffusion bundles, the mean of the ensemble's uncertainty map
inside it. :func:`review_flag` turns the ensemble's disagreement inside the predicted foreground into a review flag;
:func:`region_disagreement` measures it per axial slice (3D) or tile (2D), from which ``scripts/analyze.py
qc-threshold`` sets a bundle's ``qc_threshold``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["axial_axis", "region_disagreement", "review_flag", "structure_statistics", "write_statistics_csv"]


def _unit_size(affine: np.ndarray, spatial_dims: int) -> float:
    """mm³ (3D) or mm² (2D) of one voxel of a (4, 4) voxel → mm affine."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:spatial_dims, :spatial_dims])))


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def structure_statistics(
    label: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray,
    classes: Mapping[int, str],
    uncertainty: np.ndarray | None = None,
    measure: str = "std",
) -> dict[str, Any]:
    """Statistics of every non-background class of ``label`` (*S) int, ``affine`` its voxel → mm matrix.

    Args:
        image: the input intensities (C, *S) on the label's grid; C > 1 gives per-channel lists.
        uncertainty: the ensemble's uncertainty map (C_u, *S) (channel 0 is used) or None.
        measure: the map's measure, naming the field ``mean_ensemble_<measure>``.

    Returns:
        ``{"unit_size": ..., "classes": {name: {"index", "voxels", "volume_ml" | "area_mm2", "intensity_mean",
        "intensity_std"[, "mean_ensemble_<measure>"]}}}``; the means are None for empty classes.
    """
    label = np.asarray(label)
    dims = label.ndim
    unit = _unit_size(affine, dims)
    pixels = np.asarray(image, np.float64).reshape(image.shape[0], -1)
    flat = label.reshape(-1)
    unc = None if uncertainty is None else np.asarray(uncertainty, np.float64)[0].reshape(-1)
    if pixels.shape[1] != flat.size or (unc is not None and unc.size != flat.size):
        raise ValueError(f"image {tuple(image.shape)} / label {label.shape} grids differ: no statistics")
    size_key = "volume_ml" if dims == 3 else "area_mm2"
    out: dict[str, Any] = {}
    for index in sorted(k for k in classes if int(k) > 0):
        inside = flat == index
        n = int(inside.sum())
        entry: dict[str, Any] = {"index": int(index), "voxels": n}
        entry[size_key] = _rounded(n * unit / (1000.0 if dims == 3 else 1.0))
        means = [_rounded(v) for v in pixels[:, inside].mean(axis=1)] if n else None
        stds = [_rounded(v) for v in pixels[:, inside].std(axis=1)] if n else None
        scalar = pixels.shape[0] == 1
        entry["intensity_mean"] = means[0] if scalar and means else means
        entry["intensity_std"] = stds[0] if scalar and stds else stds
        if unc is not None:
            entry[f"mean_ensemble_{measure}"] = _rounded(unc[inside].mean()) if n else None
        out[classes[index]] = entry
    return {("voxel_volume_mm3" if dims == 3 else "pixel_area_mm2"): _rounded(unit), "classes": out}


def review_flag(
    label: np.ndarray, uncertainty: np.ndarray, measure: str, samples: int, threshold: float | None
) -> dict[str, Any]:
    """The manifest's ``qc``: mean per-voxel disagreement (the uncertainty map, channel 0) inside the predicted
    foreground (label > 0), and ``review`` = it exceeds ``threshold`` (None without a threshold or foreground)."""
    foreground = np.asarray(label).reshape(-1) > 0
    values = np.asarray(uncertainty, np.float64)[0].reshape(-1)
    n = int(foreground.sum())
    value = _rounded(values[foreground].mean()) if n else None
    review = None if threshold is None or value is None else bool(value > threshold)
    return {
        "measure": measure,
        "samples": int(samples),
        "foreground_voxels": n,
        "disagreement": value,
        "threshold": threshold,
        "review": review,
    }


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of a (4, 4) voxel → mm affine that runs closest to the patient's head–foot (z) direction."""
    columns = np.asarray(affine, np.float64)[:3, :3]
    return int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))


def region_disagreement(
    label: np.ndarray,
    uncertainty: np.ndarray,
    affine: np.ndarray | None = None,
    min_voxels: int = 50,
    tile: int = 64,
) -> list[dict[str, Any]]:
    """The mean of ``uncertainty`` (*S) inside the predicted foreground (``label`` (*S) > 0) per region: every axial
    slice (:func:`axial_axis` of ``affine``; None: the last axis) with at least ``min_voxels`` foreground voxels for a
    3D label, every ``tile`` × ``tile`` tile of a grid from pixel (0, 0) (edge tiles smaller) with foreground for a
    2D one. Returns ``[{"region", "foreground_voxels", "disagreement"}]`` in slice / row-major tile order."""
    label, uncertainty = np.asarray(label), np.asarray(uncertainty, np.float64)
    if label.shape != uncertainty.shape:
        raise ValueError(f"label {label.shape} and uncertainty {uncertainty.shape} grids differ")
    regions: list[tuple[str, tuple[slice, ...]]] = []
    if label.ndim == 3:
        axis = 2 if affine is None else axial_axis(affine)
        for k in range(label.shape[axis]):
            index = [slice(None)] * 3
            index[axis] = slice(k, k + 1)
            regions.append((f"slice {k} of axis {axis}", tuple(index)))
        least = min_voxels
    elif label.ndim == 2:
        for r in range(0, label.shape[0], tile):
            for c in range(0, label.shape[1], tile):
                regions.append((f"tile {r}:{r + tile}, {c}:{c + tile}", (slice(r, r + tile), slice(c, c + tile))))
        least = 1
    else:
        raise ValueError(f"a 2D or 3D label is expected, got shape {label.shape}")
    out = []
    for name, index in regions:
        inside = label[index] > 0
        n = int(inside.sum())
        if n >= least:
            out.append(
                {"region": name, "foreground_voxels": n, "disagreement": _rounded(uncertainty[index][inside].mean())}
            )
    return out


def write_statistics_csv(path: str | os.PathLike[str], output: Path, cases: Sequence[Mapping[str, Any]]) -> None:
    """``statistics.csv`` at ``path``: one row per case and class (columns ``case``, ``class`` and the fields of
    :func:`structure_statistics`; lists as JSON), from the ``statistics.json`` of each ok case of ``cases``."""
    rows, columns = [], ["case", "class"]
    for case in cases:
        name = f"{case['id']}/statistics.json"
        if case.get("status") != "ok" or name not in case.get("outputs", []):
            continue
        stats = json.loads((output / name).read_text())
        for cls, entry in stats["classes"].items():
            rows.append({"case": case["id"], "class": cls, **entry})
            columns += [k for k in entry if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
