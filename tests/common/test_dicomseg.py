"""diffseg.dicomseg: SNOMED codes, blank-UID sources, SEG pixels = the label resampled onto the source instances."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_testing import dciodvfy_errors, write_ct_series
from monai.transforms import LoadImage

from diffseg.dicomseg import label_on_dicom_grid, property_codes, read_sources, write_dicom_seg

CLASSES = {0: "background", 1: "spleen", 2: "kidney right", 3: "abdominal organs"}


@pytest.mark.parametrize(
    ("name", "code", "standard"),
    [
        ("spleen", "78961009", True),
        ("inferior vena cava", "64131007", True),
        ("kidney right", "64033007", True),
        ("adrenal gland left", "23451007", True),
        ("portal vein and splenic vein", "32764006", True),
        ("nucleus", "84640000", True),
        ("abdominal organs", "91772007", False),  # generic Organ
        ("tumour core", "85756007", False),  # generic Tissue
    ],
)
def test_property_codes(name, code, standard):
    category, kind, is_standard = property_codes(name)
    assert kind.value == code and kind.scheme_designator == "SCT" and is_standard == standard
    assert category.value in ("91723000", "85756007")  # Anatomical Structure / Tissue


def test_blank_uids_are_filled_deterministically(tmp_path):
    files = write_ct_series(tmp_path, slices=2, blank_uids=True)
    first, notes = read_sources(files)
    second, _ = read_sources(files)
    assert first[0].StudyInstanceUID == second[0].StudyInstanceUID != ""
    assert first[0].SOPInstanceUID == pydicom.dcmread(files[0]).file_meta.MediaStorageSOPInstanceUID
    assert any("blank StudyInstanceUID" in n for n in notes) and any("blank SeriesInstanceUID" in n for n in notes)


def test_seg_pixels_equal_the_label_mapped_onto_each_instance(tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=4, blank_uids=True)
    image = LoadImage(image_only=True)(str(tmp_path / "ct"))  # how the bundle reads the series (RAS affine)
    affine = image.affine.numpy()
    label = np.random.default_rng(0).integers(0, 4, image.shape).astype(np.uint8)
    notes = write_dicom_seg(label, affine, files, CLASSES, tmp_path / "seg.dcm", "my_bundle", "1.2.3")
    assert notes  # blank source UIDs reported
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [s.file_meta.MediaStorageSOPInstanceUID for s in sources]
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    # independent direction: every label voxel → world (LPS) → (instance, row, column)
    i, j, k = np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1).reshape(-1, 4) @ affine.T
    lps = ras[:, :3] * [-1, -1, 1]
    z = np.asarray([float(s.ImagePositionPatient[2]) for s in sources])
    frame = np.abs(lps[:, 2:3] - z[None]).argmin(1)
    origin = np.asarray([[float(v) for v in s.ImagePositionPatient] for s in sources])[frame]
    step = [float(v) for v in sources[0].PixelSpacing]
    col = np.rint((lps[:, 0] - origin[:, 0]) / step[1]).astype(int)
    row = np.rint((lps[:, 1] - origin[:, 1]) / step[0]).astype(int)
    assert np.array_equal(got[frame, row, col], label.reshape(-1))
    assert got.size == label.size  # same grid: nothing outside the label volume
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "kidney right", "abdominal organs"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("my_bundle", "1.2.3")
    assert seg.StudyInstanceUID == read_sources(files)[0][0].StudyInstanceUID


def test_pixels_outside_the_label_volume_are_background(tmp_path):
    files = write_ct_series(tmp_path, slices=2)
    sources, _ = read_sources(files)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 1e4  # far away from the series
    assert not label_on_dicom_grid(np.ones((4, 4, 4), np.uint8), affine, sources).any()


def test_dciodvfy_finds_no_errors_of_the_seg_itself(tmp_path):
    """dicom3tools' validator: a SEG of a clean series has no Error line; one of a series with invalid UIDs has
    exactly the errors about those inherited UIDs, which the helper separates from the SEG's own."""
    for name, attributes in {
        "clean": {},
        "bad_uids": {"series_uid": "1.2.03.4", "StudyInstanceUID": "1.2.3.04.5"},
    }.items():
        files = write_ct_series(tmp_path / name, slices=2, **attributes)
        label = np.zeros((128, 128, 2), np.uint8)
        label[10:40, 20:60] = 1
        affine = LoadImage(image_only=True)(str(tmp_path / name)).affine.numpy()
        write_dicom_seg(label, affine, files, CLASSES, tmp_path / f"{name}.dcm", "my_bundle", "1.2.3")
        own, inherited = dciodvfy_errors(tmp_path / f"{name}.dcm", files)
        assert own == [], own
        if name == "clean":
            assert inherited == []
        else:
            assert any("<1.2.03.4>" in line for line in inherited) and any("<1.2.3.04.5>" in line for line in inherited)
