"""Find the cases of an input folder: image files and DICOM series, each with a stable id.

A *case* is one image a bundle segments: a NIfTI / NRRD / MHA / MHD volume, a 2D PNG / TIFF (2D bundles), or a
DICOM series. DICOM files are recognised by their suffix (``.dcm``, ``.dicom``, ``.ima``), or by the ``DICM`` magic
when they have no suffix, and grouped into series by SeriesInstanceUID. When that UID is blank (the TotalSegmentator
example series has blank Study/Series/SOP UIDs) the fallback key is FrameOfReferenceUID + modality + series number
and description + geometry (rows, columns, orientation, pixel spacing); a series spread over several folders is one
case. Within a series, copies of one instance (same SOPInstanceUID, else the file meta's, else the file itself; same
position and InstanceNumber) count once: identical copies are *ignored*, copies with truncated pixel data *dropped*,
each named in the case's ``notes``; an instance without a readable copy fails its series, naming the file. Objects
that are not images (SEG, SR, RT*, presentation states, key objects, encapsulated documents), localizers and files a
bundle cannot take become *skipped* cases with a reason; unreadable DICOM headers, multi-frame (enhanced) objects and
inconsistent ("mixed") series become *failed* cases with a reason. Every file under the input is accounted for: in
one case's ``sources`` or in :attr:`Inventory.skipped_files` with the reason. DICOM image files are read whole (their
pixel bytes counted, not decoded; only differing copies of one instance are decoded, to pick one that decodes).
"""

from __future__ import annotations

import filecmp
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffseg.io import IMAGE_SUFFIXES

__all__ = [
    "DICOM_SUFFIXES",
    "PLANAR_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Case",
    "Inventory",
    "discover",
    "dicom_geometry",
    "pixel_data_problem",
    "scan",
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
    the slice normal (``input`` is then the series folder, the common parent of its ``folders`` when the files come
    from several). ``sources`` are all input files the case accounts for: its files, ignored or dropped copies, a
    MetaImage header's pixel file.
    """

    id: str
    input: str
    kind: str  # "volume" | "planar" | "dicom" | "other"
    files: tuple[str, ...] = ()
    status: str | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)
    sources: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()


@dataclass
class Inventory:
    """What :func:`scan` found under one input: its cases, the files in no case (file → reason), the files found."""

    cases: list[Case]
    skipped_files: dict[str, str]
    found: int


@dataclass
class _Instance:
    path: str
    ds: Any  # the header, up to the Pixel Data
    problem: str | None = None


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


def _rel(path: str | Path, root: Path) -> str:
    path = Path(path)
    return str(path.relative_to(root)) if path != root else path.name


def _read_header(path: str, force: bool = True) -> tuple[Any, int]:
    """The dataset up to its Pixel Data, and the file offset where the Pixel Data starts."""
    import pydicom

    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=force)
        return ds, f.tell()


def _pixel_problem(header, start: int, path: str, decode: bool = False) -> str | None:
    """Why the Pixel Data of the image file ``path`` (``header`` and ``start`` from :func:`_read_header`) is
    truncated or, with ``decode``, cannot be decoded; else None."""
    import pydicom
    from pydicom.pixels.utils import get_expected_length

    if any(k in header for k in ("FloatPixelData", "DoubleFloatPixelData")):
        return None
    step = "read"
    try:
        with warnings.catch_warnings():  # a truncated encapsulated Pixel Data: pydicom warns, returns an empty dataset
            warnings.simplefilter("ignore", UserWarning)
            full = pydicom.dcmread(path, force=True)
        syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_encapsulated:
            if "PixelData" not in full:
                got = os.path.getsize(path) - start
                return f"truncated pixel data (the file ends {got} bytes into the encapsulated {syntax.name} frames)"
        else:
            expected = get_expected_length(header, "bytes")
            got = len(full.PixelData) if "PixelData" in full else 0
            if got < expected:
                return f"truncated pixel data (expected {expected} bytes, got {got})"
        if decode:
            step = "decoded"
            full.pixel_array  # noqa: B018 - decoding is the check
    except Exception as e:  # pydicom and the decoders raise many types
        message = re.sub(r" at 0x[0-9a-f]+", "", " ".join(str(e).split()))  # no object addresses: reproducible
        return f"pixel data cannot be {step} ({type(e).__name__}: {message[:300]})"
    return None


def pixel_data_problem(path: str | os.PathLike[str]) -> str | None:
    """Why pydicom cannot read the pixel data of the DICOM image file ``path`` (truncated, or the decoder's error),
    else None. Decodes the pixels."""
    try:
        header, start = _read_header(str(path))
    except Exception as e:  # pydicom raises many types for broken files
        return f"unreadable DICOM: {e}"
    return _pixel_problem(header, start, str(path), decode=True)


def _instance_key(instance: _Instance) -> tuple:
    """Copies of one instance share this key: SOPInstanceUID (the file meta's when blank, else the file itself, so
    distinct slices never merge), slice position and InstanceNumber."""
    ds = instance.ds
    uid = ds.get("SOPInstanceUID")
    if _blank(uid):
        uid = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", None)
    position = tuple(np.round(dicom_geometry(ds)[0], 3))
    return str(instance.path if _blank(uid) else uid), position, str(ds.get("InstanceNumber", ""))


def _readable_copy(copies: Sequence[_Instance]) -> _Instance | None:
    """The first copy with complete pixel data; when the complete copies differ, the first that decodes."""
    readable = [c for c in copies if c.problem is None]
    if len(readable) < 2 or all(filecmp.cmp(readable[0].path, c.path, shallow=False) for c in readable[1:]):
        return readable[0] if readable else None
    for copy in readable:
        copy.problem = pixel_data_problem(copy.path)
        if copy.problem is None:
            return copy
    return None


def _deduplicate(members: Sequence[_Instance], root: Path) -> tuple[list[_Instance], list[str], list[str]]:
    """(one copy per instance, notes naming the ignored / dropped copies, errors of instances without a readable
    copy). Copies in the folder holding most of the series are preferred, then the first path."""
    per_folder = Counter(str(Path(m.path).parent) for m in members)
    copies: dict[tuple, list[_Instance]] = defaultdict(list)
    for member in sorted(members, key=lambda m: (-per_folder[str(Path(m.path).parent)], m.path)):
        copies[_instance_key(member)].append(member)
    kept, notes, errors = [], [], []
    for group in copies.values():
        chosen = _readable_copy(group)
        if chosen is None:
            errors += [f"{_rel(c.path, root)}: {c.problem}" for c in group]
            continue
        kept.append(chosen)
        used = _rel(chosen.path, root)
        for other in (c for c in group if c is not chosen):
            if other.problem:
                notes.append(f"dropped {_rel(other.path, root)}: {other.problem}; its copy {used} is used")
            elif filecmp.cmp(chosen.path, other.path, shallow=False):
                notes.append(f"ignored duplicate {_rel(other.path, root)}: identical copy of {used}")
            else:
                notes.append(f"ignored duplicate {_rel(other.path, root)}: same instance as {used} (different bytes)")
    return kept, notes, errors


def _check_series(datasets: Sequence, names: Sequence[str]) -> str | None:
    """Reason why the instances (files ``names``) do not form one volume (a "mixed series"), else None."""
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
    depth = np.round([float(g[0] @ normal) for g in geometry], 3)
    values, counts = np.unique(depth, return_counts=True)
    if len(values) < len(depth):
        shared = values[counts > 1][0]
        first, second = [n for n, d in zip(names, depth, strict=True) if d == shared][:2]
        return (
            f"mixed series: {len(depth) - len(values)} instance(s) share a slice position "
            f"(e.g. {first} and {second} at {shared:g} mm)"
        )
    return None


def _sort_along_normal(datasets: Sequence, paths: Sequence[str]) -> tuple[str, ...]:
    position, rows, cols, _ = dicom_geometry(datasets[0])
    normal = np.cross(rows, cols)
    order = np.argsort([float(dicom_geometry(ds)[0] @ normal) for ds in datasets], kind="stable")
    return tuple(paths[i] for i in order)


def _file_case(path: Path, root: Path, status: str, error: str) -> Case:
    return Case(_safe_id(_rel(path, root)), str(path), "dicom", status=status, error=error, sources=(str(path),))


def _series_case(key: tuple, members: Sequence[_Instance], root: Path) -> tuple[Case, str]:
    """One series' case (copies collapsed, broken copies dropped) and the id suffix for a folder of several series."""
    kept, notes, errors = _deduplicate(members, root)
    paths = sorted(m.path for m in kept)
    folders = sorted({str(Path(p).parent) for p in (paths or [m.path for m in members])})
    folder = Path(os.path.commonpath(folders))
    ds = (kept or members)[0].ds
    label = ds.get("SeriesDescription") or ds.get("Modality") or ""
    suffix = _safe_id(f"s{ds.get('SeriesNumber', '')}_{label}_{len(paths)}")
    sources = tuple(sorted(m.path for m in members))
    case = Case(_safe_id(_rel(folder, root)), str(folder), "dicom", tuple(paths), notes=notes, sources=sources)
    case.folders = tuple(folders)
    datasets = [m.ds for m in sorted(kept, key=lambda m: m.path)]
    problem = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    problem = problem or _check_series(datasets, [_rel(p, root) for p in paths])
    if problem:
        case.status, case.error = "failed", problem
    else:
        case.files = _sort_along_normal(datasets, paths)
        if key[0] == "geometry":
            case.notes.insert(0, "blank SeriesInstanceUID: grouped by FrameOfReferenceUID and geometry")
    return case, suffix


def _group_dicom(paths: Iterable[Path], root: Path) -> list[Case]:
    cases: list[Case] = []
    series: dict[tuple, list[_Instance]] = defaultdict(list)
    for path in paths:
        try:
            ds, start = _read_header(str(path), force=path.name.lower().endswith(DICOM_SUFFIXES))
            if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID")):
                raise ValueError("no SOPClassUID, Modality, Rows or StudyInstanceUID: not a DICOM object")
        except Exception as e:  # pydicom raises many types for broken files
            cases.append(_file_case(path, root, "failed", f"unreadable DICOM: {e}"))
            continue
        problem = _dicom_problem(ds)
        if problem:
            cases.append(_file_case(path, root, *problem))
            continue
        instance = _Instance(str(path), ds, _pixel_problem(ds, start, str(path)))
        series[_series_key(ds)].append(instance)
    built = [_series_case(key, members, root) for key, members in series.items()]
    built.sort(key=lambda pair: pair[0].sources[0])
    per_folder = Counter(case.input for case, _ in built)
    for case, suffix in built:
        if per_folder[case.input] > 1:
            case.id += "_" + suffix
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


def scan(input_path: str | os.PathLike[str], spatial_dims: int = 3) -> Inventory:
    """The cases under ``input_path`` (a file or a folder, searched recursively), sorted by input path, and the files
    that belong to no case.

    Args:
        input_path: an image file, a DICOM file, or a folder.
        spatial_dims: the bundle's input dimensionality; PNG/TIFF files are cases of 2D bundles and skipped
            (with a reason) for 3D bundles, DICOM series the other way round.

    Returns:
        Cases with stable ids (relative path without suffix; DICOM: the series folder, plus series number,
        description or modality and size when a folder holds several series); an empty or missing folder gives
        one failed case. Files in no case: hidden files and MetaImage pixel files without a ``.mhd`` header of the
        same name. Every file found is in exactly one case's ``sources`` or in ``skipped_files``.
    """
    root = Path(input_path)
    if not root.exists():
        missing = Case(_safe_id(root.name), str(root), "other", status="failed", error=f"input {str(root)!r} not found")
        return Inventory([missing], {}, 0)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    base = root.parent if root.is_file() else root
    skipped: dict[str, str] = {}
    cases: list[Case] = []
    dicom: list[Path] = []
    companions: list[Path] = []
    for path in files:
        rel = path.relative_to(base)
        if root.is_dir() and any(part.startswith(".") for part in rel.parts):
            skipped[str(path)] = "hidden file or folder"
            continue
        ident = _safe_id(str(rel.parent / _stem(path)) if str(rel.parent) != "." else _stem(path))
        if _suffix(path, VOLUME_SUFFIXES):
            cases.append(Case(ident, str(path), "volume", sources=(str(path),)))
        elif _suffix(path, PLANAR_SUFFIXES):
            if spatial_dims == 2:
                cases.append(Case(ident, str(path), "planar", sources=(str(path),)))
            else:
                reason = "2D PNG/TIFF image: this bundle segments 3D volumes"
                cases.append(Case(ident, str(path), "planar", status="skipped", error=reason, sources=(str(path),)))
        elif _suffix(path, COMPANION_SUFFIXES):
            companions.append(path)
        elif _is_dicom_candidate(path):
            dicom.append(path)
        else:
            reason = f"not an image file this CLI reads (suffix {path.suffix or 'none'!r})"
            cases.append(Case(ident, str(path), "other", status="skipped", error=reason, sources=(str(path),)))
    headers = {c.input: c for c in cases if c.input.lower().endswith(".mhd")}
    for path in companions:
        header = headers.get(str(path.with_name(path.name[: -len(_suffix(path, COMPANION_SUFFIXES))] + ".mhd")))
        if header is not None:
            header.sources += (str(path),)
        else:
            skipped[str(path)] = "MetaImage pixel file without a .mhd header of the same name"
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
    return Inventory(unique_ids(cases), skipped, len(files))


def discover(input_path: str | os.PathLike[str], spatial_dims: int = 3) -> list[Case]:
    """The cases of :func:`scan`."""
    return scan(input_path, spatial_dims).cases
