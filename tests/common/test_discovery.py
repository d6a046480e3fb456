"""diffseg.discovery: case ids, DICOM series grouping (blank UIDs), duplicate / truncated / split series, skipped and
failed objects with reasons, every file accounted for."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_testing import copied_series, pydicom_file, write_ct_series

from diffseg.discovery import discover, scan


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
    assert case.status == "failed" and "mixed series: 2 instance(s) share a slice position" in case.error
    assert "(e.g. p/x/IM0002 and p/y/Y0002 at " in case.error  # two of the files, at the first shared position
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


@pytest.fixture
def real_series(tmp_path):
    """The TotalSegmentator series (20 slices, JPEG 2000, blank Study/Series/SOP UIDs) in each scenario's folder."""
    from diffseg.data import data_path

    return copied_series(data_path("totalsegmentator/example_ct_dicom"), tmp_path)


def one_case(folder):
    inventory = scan(folder)
    (case,) = inventory.cases
    assert inventory.skipped_files == {} and len(case.sources) == inventory.found  # every file in the case
    return case


@pytest.mark.data
def test_a_series_copied_twice_is_one_case_naming_each_ignored_copy(real_series):
    case = one_case(real_series[0]["twice"])
    assert case.status is None and case.id == "a"
    assert len(case.files) == 20 and {Path(f).parent.name for f in case.files} == {"a"} and len(case.sources) == 40
    ignored = [n for n in case.notes if n.startswith("ignored duplicate b/")]
    assert len(ignored) == 20 and all("identical copy of a/" in n for n in ignored)


@pytest.mark.data
def test_a_truncated_copy_in_another_folder_is_dropped_with_a_note(real_series):
    folders, broken = real_series
    case = one_case(folders["truncated_copy"])
    assert (
        case.status is None
        and case.id == "ct"
        and len(case.files) == 20
        and case.folders == (str(folders["truncated_copy"] / "ct"),)
    )
    (note,) = [n for n in case.notes if n.startswith("dropped")]
    assert re.fullmatch(
        rf"dropped other/{re.escape(broken)}: truncated pixel data \(the file ends \d+ bytes into the encapsulated "
        rf"JPEG 2000 Image Compression \(Lossless Only\) frames\); its copy ct/{re.escape(broken)} is used",
        note,
    ), note


@pytest.mark.data
def test_the_only_copy_of_a_slice_truncated_fails_the_series_naming_the_file(real_series):
    folders, broken = real_series
    case = one_case(folders["only_copy_truncated"])
    assert case.status == "failed" and case.error.startswith(f"{broken}: truncated pixel data (the file ends ")
    assert "mixed" not in case.error and "position" not in case.error


@pytest.mark.data
def test_a_series_split_across_two_folders_is_one_case_listing_both(real_series):
    folders, _ = real_series
    case = one_case(folders["split"])
    assert case.status is None and case.id == "split" and len(case.files) == 20
    assert case.folders == (str(folders["split"] / "part1"), str(folders["split"] / "part2"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in case.files]
    assert len(set(z)) == 20 and z == sorted(z)  # one volume, sorted along the normal across both folders


@pytest.mark.data
def test_the_real_truncated_mr_file_counts_its_bytes(tmp_path):
    """pydicom's MR_truncated.dcm: MR_small.dcm's instance (same SOPInstanceUID) with 62 bytes of pixels missing."""
    from diffseg.data import data_path

    for folder, name in (("a", "MR_truncated.dcm"), ("b", "MR_small.dcm")):
        (tmp_path / folder).mkdir()
        shutil.copy(data_path(f"pydicom/{name}"), tmp_path / folder / name)
    (alone,) = discover(tmp_path / "a")
    assert alone.status == "failed"
    assert alone.error == "MR_truncated.dcm: truncated pixel data (expected 8192 bytes, got 8130)"  # 64 × 64 × 2
    case = one_case(tmp_path)
    assert case.status is None and case.id == "b" and [Path(f).name for f in case.files] == ["MR_small.dcm"]
    (note,) = case.notes
    assert note == (
        "dropped a/MR_truncated.dcm: truncated pixel data (expected 8192 bytes, got 8130); "
        "its copy b/MR_small.dcm is used"
    )


def test_distinct_slices_with_one_sop_instance_uid_or_none_are_never_merged(tmp_path):
    files = write_ct_series(tmp_path / "same", slices=3)
    for path in files:  # a broken exporter: one SOPInstanceUID for every slice
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.save_as(path)
    files = write_ct_series(tmp_path / "none", slices=3, blank_uids=True)
    for path in files:  # no SOPInstanceUID anywhere
        ds = pydicom.dcmread(path)
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path)
    cases = {c.id: c for c in discover(tmp_path)}
    assert {k: (c.status, len(c.files)) for k, c in cases.items()} == {"same": (None, 3), "none": (None, 3)}


@pytest.mark.data
def test_every_file_is_in_one_case_or_skipped_with_a_reason(real_series):
    root = real_series[0]["truncated_copy"]  # ct/ (20 files) and other/ (a truncated copy)
    for name in ("x.mhd", "x.raw", "orphan.zraw", ".DS_Store", ".git/config", "notes.txt", "sub/vol.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    shutil.copy(pydicom_file("rtstruct.dcm"), root / "rt.dcm")
    found = sorted(str(p) for p in root.rglob("*") if p.is_file())
    inventory = scan(root)
    assert inventory.found == len(found) == 29
    listed = [f for case in inventory.cases for f in case.sources] + list(inventory.skipped_files)
    assert sorted(listed) == found  # each file exactly once
    assert inventory.skipped_files == {
        str(root / ".DS_Store"): "hidden file or folder",
        str(root / ".git" / "config"): "hidden file or folder",
        str(root / "orphan.zraw"): "MetaImage pixel file without a .mhd header of the same name",
    }
    sources = {c.id: len(c.sources) for c in inventory.cases}
    assert sources == {"ct": 21, "x": 2, "sub_vol": 1, "notes.txt": 1, "rt.dcm": 1}
