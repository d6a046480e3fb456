"""Find the cases of an input folder: image files and DICOM series, each with a stable id.

A *case* is one image a bundle segments: a NIfTI / NRRD / MHA / MHD volume, a 2D PNG / TIFF (2D bundles), or a
DICOM series. DICOM files are recognised by their suffix (``.dcm``, ``.dicom``, ``.ima``), or by the ``DICM`` magic
when they have no suffix, and grouped into series by SeriesInstanceUID. When that UID is blank (the TotalSegmentator
example series has blank Study/Series/SOP UIDs) the fallback key is FrameOfReferenceUID + modality + series number
and description + geometry (rows, columns, orientation, pixel spacing). Objects that are not images (SEG, SR, RT*,
presentation states, key objects, encapsulated documents), localizers and files a bundle cannot take become
*skipped* cases with a reason; unreadable DICOM headers, multi-frame (enhanced) objects and inconsistent ("mixed")
series become *failed* cases with a reason. Nothing here reads pixel data.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffseg.io import IMAGE_SUFFIXES

__all__ = [
    "DICOM_SUFFIXES",
    "PLANAR_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Case",
    "discover",
    "dicom_geometry",
    "unique_ids",
]

VOLUME_SUFFIXES = IMAGE_SUFFIXES
PLANAR_SUFFIXES = (".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
COMPANION_SUFFIXES = (".raw", ".zraw")  # pixel files of .mhd headers
NON_IMAGE_CLASS_WORDS = (
    "Segmentation",
    "SR Storage",
    "RT ",
    "Presentation State",
    "Key Object",
    "Encapsulated",
    "Raw Data",
    "Waveform",
    "Spectroscopy",
    "Surface",
    "Document",
    "Registration",
)


@dataclass
class Case:
    """One unit of work. ``status`` is None for a runnable case, else ``"skipped"``/``"failed"`` with ``error``.

    ``input`` is the file the bundle's ``LoadImaged`` reads; DICOM cases carry their instance ``files`` sorted along
    the slice normal (``input`` is then the series folder).
    """

    id: str
    input: str
    kind: str  # "volume" | "planar" | "dicom" | "other"
    files: tuple[str, ...] = ()
    status: str | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def _is_dicom_candidate(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if path.suffix and not re.fullmatch(r"\.\d+", path.suffix):  # "CT.1.3.12.…" style names have numeric "suffixes"
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _suffix(path: Path, suffixes: Sequence[str]) -> str | None:
    name = path.name.lower()
    return next((s for s in suffixes if name.endswith(s)), None)


def _stem(path: Path) -> str:
    name = path.name
    for s in (*VOLUME_SUFFIXES, *PLANAR_SUFFIXES, *DICOM_SUFFIXES):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _blank(value: object) -> bool:
    return value is None or str(value).strip() == ""


def dicom_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(position (3,), row direction (3,), column direction (3,), (row spacing, column spacing)) in LPS mm.

    Raises:
        ValueError: a missing ImagePositionPatient / ImageOrientationPatient / PixelSpacing.
    """
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if _blank(ds.get(k))]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (no patient geometry)")
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    spacing = tuple(float(v) for v in ds.PixelSpacing)
    return np.asarray([float(v) for v in ds.ImagePositionPatient]), orientation[:3], orientation[3:], spacing


def _series_key(ds) -> tuple:
    uid = ds.get("SeriesInstanceUID")
    if not _blank(uid):
        return ("uid", str(uid))
    iop = tuple(np.round([float(v) for v in ds.get("ImageOrientationPatient") or []], 4))
    spacing = tuple(np.round([float(v) for v in ds.get("PixelSpacing") or []], 4))
    return (
        "geometry",
        str(ds.get("FrameOfReferenceUID", "")),
        str(ds.get("Modality", "")),
        str(ds.get("SeriesNumber", "")),
        str(ds.get("SeriesDescription", "")),
        ds.get("Rows"),
        ds.get("Columns"),
        iop,
        spacing,
    )


def _class_name(ds) -> str:
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return UID(str(uid)).name if not _blank(uid) else "unknown SOP class"


def _dicom_problem(ds) -> tuple[str, str] | None:
    """("skipped" | "failed", reason) when one DICOM object cannot be part of an image series."""
    name = _class_name(ds)
    if any(word in name for word in NON_IMAGE_CLASS_WORDS) or _blank(ds.get("Rows")):
        return "skipped", f"not an image: DICOM {name} ({ds.get('Modality', '?')}) objects are not segmented"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if {"LOCALIZER", "SCOUT"} & set(image_type):
        return "skipped", f"localizer/scout image (ImageType {'/'.join(image_type)})"
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        return "failed", (
            f"multi-frame (enhanced) DICOM ({name}, {frames} frames) is not supported; "
            "convert it to single-frame DICOM or NIfTI"
        )
    try:
        dicom_geometry(ds)
    except ValueError as e:
        return "failed", f"DICOM {name}: {e}"
    return None


def _check_series(datasets: Sequence) -> str | None:
    """Reason why the instances do not form one volume (a "mixed series"), else None."""
    shapes = {(ds.Rows, ds.Columns) for ds in datasets}
    if len(shapes) > 1:
        return f"mixed series: instances have different sizes {sorted(shapes)}"
    geometry = [dicom_geometry(ds) for ds in datasets]
    rows = np.stack([g[1] for g in geometry])
    cols = np.stack([g[2] for g in geometry])
    if np.abs(rows - rows[0]).max() > 1e-3 or np.abs(cols - cols[0]).max() > 1e-3:
        return "mixed series: instances have different orientations"
    spacings = {tuple(np.round(g[3], 4)) for g in geometry}
    if len(spacings) > 1:
        return f"mixed series: instances have different pixel spacings {sorted(spacings)}"
    normal = np.cross(rows[0], cols[0])
    depth = np.asarray([float(g[0] @ normal) for g in geometry])
    if len(np.unique(np.round(depth, 3))) < len(depth):
        return f"mixed series: {len(depth) - len(np.unique(np.round(depth, 3)))} instance(s) share a slice position"
    return None


def _sort_along_normal(datasets: Sequence, paths: Sequence[str]) -> tuple[str, ...]:
    position, rows, cols, _ = dicom_geometry(datasets[0])
    normal = np.cross(rows, cols)
    order = np.argsort([float(dicom_geometry(ds)[0] @ normal) for ds in datasets], kind="stable")
    return tuple(paths[i] for i in order)


def _group_dicom(paths: Iterable[Path], root: Path) -> list[Case]:
    import pydicom

    cases: list[Case] = []
    series: dict[tuple, list[tuple[str, object]]] = defaultdict(list)
    for path in paths:
        rel = str(path.relative_to(root)) if path != root else path.name
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=path.name.lower().endswith(DICOM_SUFFIXES))
            if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID")):
                raise ValueError("no SOPClassUID, Modality, Rows or StudyInstanceUID: not a DICOM object")
        except Exception as e:  # pydicom raises many types for broken files
            cases.append(Case(_safe_id(rel), str(path), "dicom", status="failed", error=f"unreadable DICOM: {e}"))
            continue
        problem = _dicom_problem(ds)
        if problem:
            cases.append(Case(_safe_id(rel), str(path), "dicom", status=problem[0], error=problem[1]))
            continue
        series[_series_key(ds)].append((str(path), ds))
    per_folder: dict[str, int] = defaultdict(int)
    for members in series.values():
        per_folder[str(Path(members[0][0]).parent)] += 1
    for key, members in sorted(series.items(), key=lambda kv: sorted(p for p, _ in kv[1])[0]):
        members.sort(key=lambda m: m[0])
        paths_, datasets = [p for p, _ in members], [d for _, d in members]
        folder = Path(paths_[0]).parent
        rel = str(folder.relative_to(root)) if folder != root else root.name
        ident = _safe_id(rel)
        if per_folder[str(folder)] > 1:
            ds = datasets[0]
            label = ds.get("SeriesDescription") or ds.get("Modality") or ""
            ident += "_" + _safe_id(f"s{ds.get('SeriesNumber', '')}_{label}_{len(paths_)}")
        case = Case(ident, str(folder), "dicom", files=tuple(paths_))
        problem = _check_series(datasets)
        if problem:
            case.status, case.error = "failed", problem
        else:
            case.files = _sort_along_normal(datasets, paths_)
            if key[0] == "geometry":
                case.notes.append("blank SeriesInstanceUID: grouped by FrameOfReferenceUID and geometry")
        cases.append(case)
    return cases


def unique_ids(cases: list[Case]) -> list[Case]:
    """Make case ids unique in order (a repeated id gets ``_2``, ``_3``, …); changes and returns ``cases``."""
    seen: dict[str, int] = defaultdict(int)
    for case in cases:
        seen[case.id] += 1
        if seen[case.id] > 1:
            case.id = f"{case.id}_{seen[case.id]}"
    return cases


def discover(input_path: str | os.PathLike[str], spatial_dims: int = 3) -> list[Case]:
    """The cases under ``input_path`` (a file or a folder, searched recursively), sorted by input path.

    Args:
        input_path: an image file, a DICOM file, or a folder.
        spatial_dims: the bundle's input dimensionality; PNG/TIFF files are cases of 2D bundles and skipped
            (with a reason) for 3D bundles, DICOM series the other way round.

    Returns:
        Cases with stable ids (relative path without suffix; DICOM: the series folder, plus series number,
        description or modality and size when a folder holds several series). An empty or missing folder gives
        one failed case.
    """
    root = Path(input_path)
    if not root.exists():
        return [Case(_safe_id(root.name), str(root), "other", status="failed", error=f"input {str(root)!r} not found")]
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root.parent).parts)]
    base = root.parent if root.is_file() else root
    cases: list[Case] = []
    dicom: list[Path] = []
    for path in files:
        rel = path.relative_to(base)
        ident = _safe_id(str(rel.parent / _stem(path)) if str(rel.parent) != "." else _stem(path))
        if _suffix(path, VOLUME_SUFFIXES):
            cases.append(Case(ident, str(path), "volume"))
        elif _suffix(path, PLANAR_SUFFIXES):
            if spatial_dims == 2:
                cases.append(Case(ident, str(path), "planar"))
            else:
                reason = "2D PNG/TIFF image: this bundle segments 3D volumes"
                cases.append(Case(ident, str(path), "planar", status="skipped", error=reason))
        elif _suffix(path, COMPANION_SUFFIXES):
            continue
        elif _is_dicom_candidate(path):
            dicom.append(path)
        else:
            reason = f"not an image file this CLI reads (suffix {path.suffix or 'none'!r})"
            cases.append(Case(ident, str(path), "other", status="skipped", error=reason))
    if dicom:
        series = _group_dicom(dicom, base)
        if spatial_dims == 2:
            for case in series:
                if case.status is None:
                    case.status, case.error = "skipped", "DICOM series are inputs of 3D bundles"
        cases += series
    if not any(c.kind != "other" for c in cases):
        suffixes = ", ".join((*VOLUME_SUFFIXES, *(PLANAR_SUFFIXES if spatial_dims == 2 else ()), "DICOM"))
        cases.append(
            Case(_safe_id(root.name), str(root), "other", status="failed", error=f"no images ({suffixes}) in {root}")
        )
    cases.sort(key=lambda c: (c.input, c.id))
    return unique_ids(cases)
