"""scripts/segment.py for the clinic: RTSTRUCT round trips on real CT and oblique MR series (against the written label
map and the SEG, dciodvfy), per-structure statistics against numbers computed from the written files, and the
ensemble's review flag on a pair of images one of which is constructed to be uncertain."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "bundles"),
    str(Path(__file__).resolve().parents[1] / "common"),
]
from bundle_testing import BUNDLES, dice, write_nifti  # noqa: E402
from dicom_testing import dciodvfy_errors, rtstruct_masks, write_ct_series  # noqa: E402

from diffseg.deploy import load_bundle, segment_folder  # noqa: E402
from diffseg.dicomseg import label_on_dicom_grid, read_sources  # noqa: E402
from diffseg.overlay import class_rgb  # noqa: E402
from diffseg.rtstruct import RTSTRUCT_SOP_CLASS, mask_contours  # noqa: E402

BUNDLE = BUNDLES / "recycling_ddpm_3d_segmentation"
NIBABEL_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"  # real Siemens files in the nibabel wheel


def test_mask_contours_outline_exactly_the_mask_with_holes_and_diagonals():
    mask = np.zeros((12, 14), bool)
    mask[2:10, 2:12] = True
    mask[4:8, 4:9] = False  # a hole
    mask[5, 6] = True  # an island in the hole
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours at the border (a saddle)
    polygons = mask_contours(mask)
    from matplotlib.path import Path as Polygon

    r, c = np.meshgrid(np.arange(12), np.arange(14), indexing="ij")
    centres = np.stack([r.ravel(), c.ravel()], 1)
    rebuilt = np.zeros(mask.size, bool)
    for polygon in polygons:
        rebuilt ^= Polygon(polygon).contains_points(centres)
    assert np.array_equal(rebuilt.reshape(mask.shape), mask)
    outer = max(polygons, key=len)  # the box: straight edges at ±0.5 pixel, corners cut (marching squares)
    assert sorted(map(tuple, outer)) == [(1.5, 2), (1.5, 11), (2, 1.5), (2, 11.5), (9, 1.5), (9, 11.5), (9.5, 2),
                                         (9.5, 11)]  # fmt: skip
    assert len(polygons) == 5  # box, hole, island and the two diagonal pixels (a saddle is not joined)
    assert mask_contours(np.zeros((3, 3), bool)) == []


ROUND_TRIP = {  # case → (files, pixdim of the tiny network's grid, formats)
    "ct": (None, [28.0, 28.0, 20.0], ("nifti", "dicom_seg", "rtstruct")),  # TotalSegmentator patient B, blank UIDs
    "mr_tilted": (["0.dcm", "1.dcm"], [14.0, 14.0, 10.0], ("nifti", "dicom_seg", "rtstruct")),  # DTI, rows tilted 0.3°
    # CT_small's real pixels on a double-oblique grid (rotated 20° about z, tilted 30°) with 0.6 × 0.9 mm pixels: the
    # geometry rt-utils 1.2.7 gets wrong (swapped spacings)
    "ct_oblique": ("oblique", [3.0, 3.0, 3.0], ("nifti", "dicom_seg", "rtstruct")),
}


def write_oblique_series(folder: Path, slices: int = 4, step: float = 2.5) -> None:
    """CT_small copies on a double-oblique, non-square pixel grid, the slices stacked along their normal."""
    a, b = np.deg2rad(20), np.deg2rad(30)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    files = write_ct_series(folder, slices=slices, PixelSpacing=[0.6, 0.9], ImageOrientationPatient=[*row, *col])
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [
            *(np.array([-40.0, -30.0, 5.0]) + (ds.InstanceNumber - 1) * step * np.cross(row, col))
        ]
        ds.save_as(path)


def _sources(case: str, tmp_path: Path) -> Path:
    files, _, _ = ROUND_TRIP[case]
    folder = tmp_path / "in" / case
    if files == "oblique":
        write_oblique_series(folder)
    elif files is None:
        from diffseg.data import data_path

        shutil.copytree(data_path("totalsegmentator/example_ct_dicom"), folder)
    else:
        folder.mkdir(parents=True)
        for name in files:
            shutil.copy(NIBABEL_DICOM / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "case", [pytest.param("ct", marks=[pytest.mark.data, pytest.mark.slow]), "mr_tilted", "ct_oblique"]
)
def test_rtstruct_round_trip_matches_the_label_and_the_seg_slice_by_slice(tmp_path, tiny, case):
    folder = _sources(case, tmp_path)
    _, pixdim, formats = ROUND_TRIP[case]
    model = load_bundle(BUNDLE, overrides={**tiny, "pixdim": pixdim})
    out = tmp_path / "out"
    (entry,) = segment_folder(model, folder, out, formats, progress=False)["cases"]
    assert entry["status"] == "ok", entry
    assert f"{case}/rtstruct.dcm" in entry["outputs"]
    files = sorted(folder.iterdir())
    sources, _ = read_sources(files)  # frame order of the SEG's and the rebuilt masks
    uids = [str(s.SOPInstanceUID) for s in sources]
    seg = hd.seg.segread(out / case / "seg.dcm")
    seg_pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    img = nib.load(out / case / "seg.nii.gz")  # the written label map on the source grid is the SEG
    assert np.array_equal(label_on_dicom_grid(np.asarray(img.dataobj), img.affine, sources), seg_pixels)
    label = np.asarray(img.dataobj)
    for k in model.classes:  # one grid: each voxel is one source pixel (a swapped row/column spacing breaks this)
        assert (seg_pixels == k).sum() == (label == k).sum()
    masks, off_plane = rtstruct_masks(out / case / "rtstruct.dcm", sources)
    assert off_plane < 1e-3  # every contour lies in the plane of the instance it references (3-decimal mm)
    index = {name: k for k, name in model.classes.items()}
    present = [model.classes[k] for k in sorted(model.classes) if k > 0 and (seg_pixels == k).any()]
    assert list(masks) == present and len(present) >= 2  # one ROI per non-empty class, in class order
    scores = {}
    for name, mask in masks.items():
        expected = seg_pixels == index[name]
        scores[name] = dice(mask, expected)
        if expected.sum() > 50:
            assert scores[name] >= 0.95, (name, scores[name])
            for k in range(len(sources)):  # same orientation: slice by slice
                if expected[k].sum() > 50:
                    assert dice(mask[k], expected[k]) >= 0.95, (name, k)
    print(case, {k: round(v, 4) for k, v in scores.items()})
    rt = pydicom.dcmread(out / case / "rtstruct.dcm")
    assert rt.SOPClassUID == RTSTRUCT_SOP_CLASS and rt.Modality == "RTSTRUCT"
    assert rt.StudyInstanceUID == seg.StudyInstanceUID == sources[0].StudyInstanceUID  # derived where blank
    assert rt.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert sorted(referenced) == sorted(uids)  # every source instance, once
    colours = {
        str(r.ROIName): tuple(c.ROIDisplayColor)
        for r, c in zip(rt.StructureSetROISequence, rt.ROIContourSequence, strict=True)
    }
    assert colours == {name: class_rgb(index[name]) for name in present}  # the overlay's colours
    own, _ = dciodvfy_errors(out / case / "rtstruct.dcm", files)
    assert own == [], own
    stamp = (out / case / "rtstruct.dcm").stat().st_mtime_ns
    (again,) = segment_folder(model, folder, out, formats, resume=True, progress=False)["cases"]
    assert again.get("resumed") and (out / case / "rtstruct.dcm").stat().st_mtime_ns == stamp


class ImageGated(torch.nn.Module):
    """A stand-in for the bundle's U-Net: where the scaled image is bright (> 0.5) it predicts ``sure_class`` with
    logit 20 whatever the noise, elsewhere it returns the noisy mask x_t itself — so an ensemble agrees on a bright
    image and disagrees on a dark one."""

    def __init__(self, sure_class: int = 1) -> None:
        super().__init__()
        self.sure_class = sure_class

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        image, x_t = x[:, :1], x[:, 1:]
        sure = torch.zeros_like(x_t)
        sure[:, self.sure_class] = 20.0
        return torch.where(image > 0.5, sure, 5.0 * x_t)


def gated_model(tiny: dict, sure_class: int = 1, samples: int = 3, **kwargs):
    model = load_bundle(BUNDLE, overrides=tiny, samples=samples, uncertainty=None, **kwargs)
    model.network.denoiser.net = ImageGated(sure_class)
    return model


def test_review_flag_marks_the_case_the_ensemble_disagrees_on(tmp_path, tiny):
    shape, affine = (40, 36, 12), np.diag([3.0, 3.0, 3.0, 1.0])
    write_nifti(tmp_path / "in" / "bright.nii.gz", np.full(shape, 300.0, np.float32), affine)  # certain
    write_nifti(tmp_path / "in" / "dark.nii.gz", np.full(shape, -800.0, np.float32), affine)  # constructed uncertain
    model = gated_model(tiny, qc_threshold=0.05)
    result = segment_folder(model, tmp_path / "in", tmp_path / "out", ("nifti", "uncertainty", "png"), progress=False)
    assert result["settings"]["qc_threshold"] == 0.05
    cases = {c["id"]: c for c in result["cases"]}
    for ident, review in (("bright", False), ("dark", True)):
        qc = cases[ident]["qc"]
        label = np.asarray(nib.load(tmp_path / "out" / ident / "seg.nii.gz").dataobj)
        unc = np.asarray(nib.load(tmp_path / "out" / ident / "uncertainty.nii.gz").dataobj)
        assert qc["foreground_voxels"] == int((label > 0).sum()) > 0
        assert qc["disagreement"] == pytest.approx(unc[label > 0].mean(), rel=1e-5)  # from the written files
        assert qc["review"] is review and qc["measure"] == "std" and qc["samples"] == 3
        png = np.asarray(Image.open(tmp_path / "out" / ident / "overlay.png").convert("RGB"))
        assert (tuple(png[1, png.shape[1] // 2]) == (255, 0, 0)) is review  # the red frame of a flagged case
    assert cases["bright"]["qc"]["disagreement"] < 1e-6 and cases["dark"]["qc"]["disagreement"] > 0.1
    single = segment_folder(gated_model(tiny, samples=1), tmp_path / "in", tmp_path / "one", ("nifti",), progress=False)
    assert all("qc" not in c for c in single["cases"])  # one sample has no disagreement: no flag


def test_an_empty_label_gets_no_rtstruct_but_a_note_and_resumes(tmp_path, tiny):
    write_ct_series(tmp_path / "in" / "ct", slices=3, values=[np.full((128, 128), 1000)] * 3)  # bright: background
    model = gated_model(tiny, sure_class=0, samples=1)
    formats = ("nifti", "rtstruct")
    (entry,) = segment_folder(model, tmp_path / "in", tmp_path / "out", formats, progress=False)["cases"]
    assert entry["status"] == "ok" and entry["outputs"] == ["ct/seg.nii.gz"]
    assert any(n.startswith("no rtstruct.dcm: nothing was segmented") for n in entry["notes"])
    (again,) = segment_folder(model, tmp_path / "in", tmp_path / "out", formats, resume=True, progress=False)["cases"]
    assert again.get("resumed")
    (more,) = segment_folder(model, tmp_path / "in", tmp_path / "out", formats, resume=True, progress=False,
                             statistics=True)["cases"]  # fmt: skip
    assert not more.get("resumed") and "ct/statistics.json" in more["outputs"]  # a new output redoes the case


@pytest.mark.data
def test_statistics_equal_numbers_computed_from_the_written_label_and_the_image(tmp_path, tiny):
    from diffseg.data import data_path

    ct = data_path("totalsegmentator/example_ct_sm.nii.gz")  # real CT in HU, 122 × 101 × 30 at 3 mm
    shutil.copy(ct, tmp_path / "ct.nii.gz")
    write_nifti(
        tmp_path / "in2" / "crop.nii.gz",
        np.asarray(nib.load(ct).dataobj)[20:80, 20:80, 5:20],
        np.diag([1.5, 2.0, 2.5, 1.0]),
    )
    model = load_bundle(BUNDLE, overrides={**tiny, "pixdim": [6.0, 6.0, 6.0]}, samples=2, uncertainty=True)
    formats = ("nifti", "uncertainty")
    out = tmp_path / "out"
    result = segment_folder(model, [tmp_path / "ct.nii.gz", tmp_path / "in2"], out, formats, progress=False,
                            statistics=True)  # fmt: skip
    assert [c["status"] for c in result["cases"]] == ["ok", "ok"]
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    assert len(rows) == 2 * 7  # every class of every case
    for case, image_path in (("ct", tmp_path / "ct.nii.gz"), ("crop", tmp_path / "in2" / "crop.nii.gz")):
        stats = json.loads((out / case / "statistics.json").read_text())
        seg = nib.load(out / case / "seg.nii.gz")
        label = np.asarray(seg.dataobj)
        image = nib.load(image_path).get_fdata()
        unc = np.asarray(nib.load(out / case / "uncertainty.nii.gz").dataobj)
        voxel = float(np.prod(seg.header.get_zooms()[:3]))
        assert stats["voxel_volume_mm3"] == pytest.approx(voxel)
        assert len(stats["classes"]) == 7
        for name, entry in stats["classes"].items():
            inside = label == entry["index"]
            assert entry["voxels"] == int(inside.sum())
            assert entry["volume_ml"] == pytest.approx(inside.sum() * voxel / 1000, rel=1e-5)
            if inside.any():
                assert entry["intensity_mean"] == pytest.approx(image[inside].mean(), rel=1e-5, abs=1e-3)
                assert entry["intensity_std"] == pytest.approx(image[inside].std(), rel=1e-5, abs=1e-3)
                assert entry["mean_ensemble_std"] == pytest.approx(unc[inside].mean(), rel=1e-5)
            else:
                assert entry["intensity_mean"] is None and entry["mean_ensemble_std"] is None
            (row,) = [r for r in rows if r["case"] == case and r["class"] == name]
            assert int(row["voxels"]) == entry["voxels"] and float(row["volume_ml"]) == entry["volume_ml"]
        assert sum(e["voxels"] for e in stats["classes"].values()) == int((label > 0).sum())
    hu = [e["intensity_mean"] for e in json.loads((out / "ct" / "statistics.json").read_text())["classes"].values()]
    assert all(-1024 <= v <= 3071 for v in hu if v is not None)  # HU, not the network's [0, 1] scaling
