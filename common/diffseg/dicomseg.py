"""DICOM SEG output (highdicom) for a label volume segmented from a DICOM series.

The label (in the geometry MONAI read the series with: a RAS ``affine``, voxel index → mm) is resampled nearest-
neighbour onto each source instance's pixel grid (its ImagePositionPatient / ImageOrientationPatient / PixelSpacing,
LPS), so frames correspond pixel for pixel with the referenced instances. One segment per non-background class of
the bundle's ``channel_def``; the segmented property type is a SNOMED-CT code from pydicom's code dictionary where
one exists for the class name (``"kidney right"`` → Kidney; ``"nucleus"`` → Nucleus), otherwise generic
("Organ" or "Tissue"). The algorithm is identified by the bundle's name and version.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffseg.discovery import dicom_geometry

__all__ = ["equipment", "label_on_dicom_grid", "pixel_to_patient", "property_codes", "read_sources", "write_dicom_seg"]

_LATERALITY = {"left", "right", "l", "r"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def equipment(algorithm: str, version: str) -> dict[str, str]:
    """General Equipment and series description of the DICOM outputs (highdicom ``SOPClass`` keyword arguments)."""
    return {
        "manufacturer": "MONAI DiffSeg",
        "manufacturer_model_name": algorithm[:64],
        "software_versions": version,
        "device_serial_number": "none",
        "series_description": f"{algorithm} {version}"[:64],
    }


def property_codes(name: str):
    """(category, type, is_standard) SNOMED-CT codes for a class name, e.g. ``"inferior vena cava"``.

    Tries the CamelCase name without laterality words, then the part before ``" and "``, in pydicom's
    ``codes.SCT``; falls back to Organ (names containing "organ") or Tissue.
    """
    from pydicom.sr.codedict import codes

    words = [w for w in name.replace("_", " ").lower().split() if w not in _LATERALITY]
    candidates = ["".join(w.capitalize() for w in words)]
    if "and" in words:
        candidates.append("".join(w.capitalize() for w in words[: words.index("and")]))
    for candidate in candidates:
        code = getattr(codes.SCT, candidate, None) if candidate else None
        if code is not None:
            return codes.SCT.AnatomicalStructure, code, True
    generic = codes.SCT.Organ if "organ" in name.lower() else codes.SCT.Tissue
    return codes.SCT.Tissue, generic, False


def read_sources(files: Sequence[str | os.PathLike[str]]) -> tuple[list, list[str]]:
    """Headers of the source instances (no pixels), with blank UIDs filled in, and notes on what was filled.

    SOP Class/Instance UIDs come from the file meta when blank; blank Study/Series Instance UIDs are replaced by
    UIDs derived from the FrameOfReferenceUID (the same for every run on the same series); a blank
    FrameOfReferenceUID by one derived from the first file's path.
    """
    import pydicom
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    notes: list[str] = []
    seed = str(datasets[0].get("FrameOfReferenceUID", "")) or str(files[0])
    derived = {
        "StudyInstanceUID": generate_uid(entropy_srcs=["study", seed]),
        "SeriesInstanceUID": generate_uid(entropy_srcs=["series", seed]),
        "FrameOfReferenceUID": generate_uid(entropy_srcs=["frame", seed]),
    }
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        if not str(ds.get("SOPClassUID", "")).strip() and meta is not None:
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not str(ds.get("SOPInstanceUID", "")).strip() and meta is not None:
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        for key, uid in derived.items():
            if not str(ds.get(key, "")).strip():
                setattr(ds, key, uid)
                if f"blank {key}" not in " ".join(notes):
                    notes.append(f"source has a blank {key}; the DICOM outputs use the derived {uid}")
    return datasets, notes


def pixel_to_patient(ds, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """LPS mm (..., 3) of (fractional) pixel indices ``rows``, ``columns`` of the instance ``ds`` (PS3.3 C.7.6.2.1.1:
    the column index steps along the row direction by the column spacing, and vice versa)."""
    position, row_dir, col_dir, (row_spacing, col_spacing) = dicom_geometry(ds)
    rows, columns = np.asarray(rows, dtype=np.float64)[..., None], np.asarray(columns, dtype=np.float64)[..., None]
    return position + columns * col_spacing * row_dir + rows * row_spacing * col_dir


def label_on_dicom_grid(label: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """Nearest-neighbour sample of ``label`` (I, J, K) with RAS ``affine`` (4, 4) at every source pixel.

    Returns:
        (frames, rows, columns) array of ``label``'s dtype, one frame per dataset; pixels outside the label
        volume are 0.
    """
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    frames = []
    for ds in datasets:
        r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        ras = pixel_to_patient(ds, r, c) @ _LPS_TO_RAS.T
        index = np.rint(ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(label.shape)), axis=-1)
        frame = np.zeros(r.shape, dtype=label.dtype)
        i, j, k = (index[inside][:, d] for d in range(3))
        frame[inside] = label[i, j, k]
        frames.append(frame)
    return np.stack(frames)


def write_dicom_seg(
    label: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[str | os.PathLike[str]],
    classes: Mapping[int, str],
    path: str | os.PathLike[str],
    algorithm: str,
    version: str,
) -> list[str]:
    """Write ``label`` (I, J, K) int as a DICOM SEG at ``path`` referencing ``source_files``; returns notes.

    Args:
        label: class indices (0 = background) in the geometry of ``affine`` (RAS, as MONAI reads the series).
        affine: (4, 4) voxel → RAS mm.
        source_files: the series' single-frame instances.
        classes: class index → name (the bundle metadata's ``outputs.pred.channel_def``); 0 is background.
        path: output file (written as is; the caller handles atomic renaming).
        algorithm, version: bundle name and version (Segment Algorithm Identification).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets, notes = read_sources(source_files)
    frames = label_on_dicom_grid(np.asarray(label), affine, datasets)
    numbers = sorted(k for k in classes if int(k) > 0)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"class indices must be 1..N besides background 0, got {numbers}")
    family = codes.cid7162.ArtificialIntelligence
    identification = hd.AlgorithmIdentificationSequence(name=algorithm, family=family, version=version)
    descriptions = []
    for number in numbers:
        category, kind, _ = property_codes(classes[number])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=classes[number][:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.uint8 if len(numbers) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        **equipment(algorithm, version),
    )
    seg.save_as(str(Path(path)))
    return notes
