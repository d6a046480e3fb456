"""Small DICOM series for tests, built from pydicom's own CT_small.dcm (shipped in the pydicom wheel, no fetch)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

__all__ = ["pydicom_file", "write_ct_series"]


def pydicom_file(name: str) -> str:
    """Path of a file shipped inside the pydicom wheel (never downloads)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not shipped with pydicom")
    return str(path)


def write_ct_series(
    folder: Path,
    slices: int = 4,
    spacing: float = 2.5,
    blank_uids: bool = False,
    series_uid: str | None = None,
    frame_of_reference: str = "1.2.3.4.5",
    values: Sequence[np.ndarray] | None = None,
    shuffle_names: bool = True,
    prefix: str = "IM",
    **attributes,
) -> list[Path]:
    """``slices`` single-frame CT instances (128 × 128, CT_small's geometry, z step ``spacing`` mm) in ``folder``.

    ``blank_uids`` empties Study/Series/SOP UIDs like the TotalSegmentator example (SOP UIDs stay in the file meta);
    ``values`` replaces the pixels slice by slice; ``attributes`` are set on every instance. File names are not in
    slice order when ``shuffle_names`` (grouping must sort by position).
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(slices):
        ds = copy.deepcopy(template)
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = "" if blank_uids else sop
        ds.SeriesInstanceUID = "" if blank_uids else series_uid
        if blank_uids:
            ds.StudyInstanceUID, ds.SOPClassUID = "", ""
        ds.FrameOfReferenceUID = frame_of_reference
        position = [float(v) for v in template.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + i * spacing]
        ds.SliceLocation = position[2] + i * spacing
        ds.InstanceNumber = i + 1
        if values is not None:
            ds.PixelData = np.asarray(values[i], dtype=ds.pixel_array.dtype).tobytes()
        for key, value in attributes.items():
            setattr(ds, key, value)
        name = f"{prefix}{(slices - i) if shuffle_names else i:04d}"
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths
