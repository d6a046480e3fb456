"""diffseg.discovery: case ids, DICOM series grouping (blank UIDs), skipped/failed objects with reasons."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from dicom_testing import pydicom_file, write_ct_series

from diffseg.discovery import discover


def by_id(cases):
    return {c.id: c for c in cases}


def test_files_and_folders_get_stable_ids_and_kinds(tmp_path):
    for name in ("a.nii.gz", "sub/b.nii", "c.nrrd", "d.mha", "e.mhd", "e.raw", "img.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    cases = by_id(discover(tmp_path, spatial_dims=3))
    assert {k: c.kind for k, c in cases.items() if c.status is None} == {
        "a": "volume", "sub_b": "volume", "c": "volume", "d": "volume", "e": "volume"
    }  # fmt: skip
    assert cases["img"].status == "skipped" and "3D volumes" in cases["img"].error
    assert cases["notes.txt"].status == "skipped" and "'.txt'" in cases["notes.txt"].error
    assert discover(tmp_path, spatial_dims=3) == discover(tmp_path, spatial_dims=3)  # deterministic
    assert by_id(discover(tmp_path, spatial_dims=2))["img"].status is None


def test_empty_or_missing_input_is_one_failed_case(tmp_path):
    (empty,) = discover(tmp_path)
    assert empty.status == "failed" and "no images" in empty.error
    (missing,) = discover(tmp_path / "nowhere")
    assert missing.status == "failed" and "not found" in missing.error


def test_blank_uid_series_are_grouped_by_frame_of_reference_and_geometry(tmp_path):
    write_ct_series(tmp_path / "s", slices=4, blank_uids=True)
    write_ct_series(tmp_path / "s", slices=3, blank_uids=True, frame_of_reference="9.8.7", prefix="X")
    cases = discover(tmp_path)
    assert sorted(len(c.files) for c in cases) == [3, 4] and all(c.status is None for c in cases)
    assert all("blank SeriesInstanceUID" in c.notes[0] for c in cases)
    four = next(c for c in cases if len(c.files) == 4)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in four.files]
    assert z == sorted(z)  # sorted along the slice normal, not by file name


def test_series_uid_groups_across_subfolders_and_one_folder_is_one_case(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path / "p" / "x", slices=2, series_uid=uid)
    write_ct_series(tmp_path / "p" / "y", slices=2, series_uid=uid, prefix="Y")  # same positions: mixed
    (case,) = discover(tmp_path)
    assert case.status == "failed" and "mixed series" in case.error and "share a slice position" in case.error
    (single,) = discover(tmp_path / "p" / "x")
    assert single.status is None and len(single.files) == 2 and single.id == "x"


def test_mixed_sizes_in_one_series_fail(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path, slices=2, series_uid=uid)
    ds = pydicom.dcmread(tmp_path / "IM0001")
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    ds.ImagePositionPatient = [0.0, 0.0, 99.0]
    ds.save_as(tmp_path / "IM0099")
    (case,) = discover(tmp_path)
    assert case.status == "failed" and "different sizes" in case.error


def test_non_images_localizers_multiframe_and_unreadable_files(tmp_path):
    for name in ("rtstruct.dcm", "liver_1frame.dcm"):
        shutil.copy(pydicom_file(name), tmp_path / name)
    write_ct_series(tmp_path / "loc", slices=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_ct_series(tmp_path / "mf", slices=1, NumberOfFrames=10)
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 10)
    cases = by_id(discover(tmp_path))
    assert cases["rtstruct.dcm"].status == "skipped" and "RT Structure Set" in cases["rtstruct.dcm"].error
    assert cases["liver_1frame.dcm"].status == "skipped" and "Segmentation" in cases["liver_1frame.dcm"].error
    assert cases["loc_IM0001"].status == "skipped" and "localizer" in cases["loc_IM0001"].error
    assert cases["mf_IM0001"].status == "failed" and "multi-frame" in cases["mf_IM0001"].error
    assert cases["broken.dcm"].status == "failed" and "unreadable DICOM" in cases["broken.dcm"].error


@pytest.mark.data
def test_the_totalsegmentator_series_with_blank_uids_is_one_case():
    from diffseg.data import data_path

    (case,) = discover(data_path("totalsegmentator/example_ct_dicom"))
    assert case.status is None and len(case.files) == 20 and case.id == "example_ct_dicom"
    assert "blank SeriesInstanceUID" in case.notes[0]
