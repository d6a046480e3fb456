"""scripts/segment.py: the folder CLI on the recycling bundle with a tiny network (same label as `monai.bundle run`,
bad inputs, resume after an interruption, DICOM SEG on real series checked by dciodvfy, duplicate / truncated /
undecodable / split real series, every input file accounted for, two-process torchrun sharding)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "bundles"),
    str(Path(__file__).resolve().parents[1] / "common"),
    str(Path(__file__).resolve().parents[2] / "scripts"),
]
import segment  # noqa: E402
from bundle_testing import (  # noqa: E402
    BUNDLES,
    REPO,
    infer_images,
    random_ct,
    read_nifti,
    write_nifti,
)
from dicom_testing import copied_series, dciodvfy_errors, pydicom_file, write_ct_series  # noqa: E402

from diffseg.deploy import load_bundle, segment_folder  # noqa: E402
from diffseg.dicomseg import label_on_dicom_grid, read_sources  # noqa: E402

BUNDLE = BUNDLES / "recycling_ddpm_3d_segmentation"


@pytest.fixture(scope="module")
def model(tiny):
    return load_bundle(BUNDLE, overrides=tiny)


def cli(tiny, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "segment.py"), "--bundle", str(BUNDLE), "--quiet"]
    cmd += ["--overrides", json.dumps(tiny), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def manifest(out: Path) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}


def test_the_cli_label_equals_the_bundle_run_with_the_same_seed(tmp_path, tiny):
    array, affine = random_ct((36, 30, 10)), np.diag([-1.2, 1.5, 5.0, 1.0])
    seeded = {"displayable_configs#seed": 3}
    bundle_out = infer_images(BUNDLE.name, tmp_path / "bundle", {"a.nii.gz": (array, affine)}, **tiny, **seeded)
    code = segment.main(
        str(BUNDLE), str(tmp_path / "bundle" / "in"), str(tmp_path / "cli"), seed=3, formats="nifti",
        overrides=tiny, quiet=True,
    )  # fmt: skip
    assert code == 0
    expected, expected_affine = read_nifti(bundle_out / "a_seg.nii.gz")
    label, label_affine = read_nifti(tmp_path / "cli" / "a" / "seg.nii.gz")
    assert label.dtype == np.uint8 and len(np.unique(label)) > 1
    assert np.array_equal(label, expected)
    np.testing.assert_allclose(label_affine, expected_affine, atol=1e-5)
    segment.main(str(BUNDLE), str(tmp_path / "bundle" / "in"), str(tmp_path / "cli4"), seed=4, formats="nifti",
                 overrides=tiny, quiet=True)  # fmt: skip
    assert not np.array_equal(read_nifti(tmp_path / "cli4" / "a" / "seg.nii.gz")[0], expected)  # the seed is used


def test_outputs_manifest_and_settings(tmp_path, model):
    write_nifti(tmp_path / "in" / "a.nii.gz", random_ct((30, 24, 8)), np.diag([1.5, 1.5, 5.0, 1.0]))
    write_ct_series(tmp_path / "in" / "ct", slices=3, blank_uids=True)
    result = segment_folder(model, tmp_path / "in", tmp_path / "out", ("nifti", "dicom_seg", "png"), progress=False)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["bundle"] == BUNDLE.name and on_disk["version"] and on_disk["seed"] == 0
    assert on_disk["settings"]["num_inference_steps"] == 5 and on_disk["settings"]["runtime"] == "torch"
    cases = manifest(tmp_path / "out")
    assert cases["a"]["outputs"] == ["a/seg.nii.gz", "a/overlay.png"] and cases["a"]["seconds"] > 0
    assert cases["ct"]["outputs"] == ["ct/seg.nii.gz", "ct/seg.dcm", "ct/overlay.png"]
    assert "blank StudyInstanceUID" in " ".join(cases["ct"]["notes"])
    assert (tmp_path / "out" / "ct" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    seg = hd.seg.segread(tmp_path / "out" / "ct" / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "spleen" and len(seg.SegmentSequence) == 7
    assert_valid_seg(tmp_path / "out" / "ct" / "seg.dcm", (tmp_path / "in" / "ct").iterdir())
    assert not list((tmp_path / "out").rglob(".*tmp*")) and not (tmp_path / "out" / ".work").exists()


def test_unsupported_settings_fail_before_any_work(tiny):
    with pytest.raises(ValueError, match="no displayable_configs#num_inference_steps"):
        load_bundle(BUNDLES / "diffusion_probe_3d_segmentation", steps=3, load_weights=False)
    with pytest.raises(SystemExit, match="unknown format"):
        segment.main(str(BUNDLE), ".", "out", formats="nifti,jpeg", overrides=tiny)


def bad_inputs(folder: Path) -> dict[str, tuple[str, str]]:
    """Write every bad input of the issue into ``folder``; returns case id → (status, text the error must contain)."""
    good = random_ct((20, 20, 8))
    write_nifti(folder / "good.nii.gz", good)
    write_nifti(folder / "truncated.nii.gz", good)
    data = (folder / "truncated.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (folder / "text.nii").write_text("this is not an image\n" * 40)
    write_nifti(folder / "fourd.nii.gz", random_ct((10, 10, 10, 3)))
    write_nifti(folder / "flat.nii.gz", random_ct((24, 24)))
    nan = random_ct((16, 16, 8))
    nan[2, 3, 4] = np.nan
    write_nifti(folder / "nan.nii.gz", nan)
    write_nifti(folder / "small.nii.gz", random_ct((6, 6, 3)))  # one window of the U-Net's downsampling
    (folder / "unreadable").mkdir()
    (folder / "unreadable" / "x.dcm").write_bytes(b"\x00\x01 garbage")
    write_ct_series(folder / "mixed", slices=2, series_uid="1.2.3.9")
    write_ct_series(folder / "mixed", slices=2, series_uid="1.2.3.9", prefix="B")
    (folder / "objects").mkdir()
    shutil.copy(pydicom_file("rtstruct.dcm"), folder / "objects" / "rtstruct.dcm")
    (folder / "empty").mkdir()
    return {
        "good": ("ok", ""),
        "truncated": ("failed", "truncated.nii.gz"),
        "text": ("failed", "text.nii"),
        "fourd": ("failed", "fourd.nii.gz: expected 1 channel(s), got 3"),
        "flat": ("failed", "flat.nii.gz: expected a 3D image"),
        "nan": ("failed", "nan.nii.gz: image contains NaN"),
        "small": ("failed", "is too small for this network"),
        "unreadable_x.dcm": ("failed", "unreadable DICOM"),
        "mixed": ("failed", "mixed series"),
        "objects_rtstruct.dcm": ("skipped", "RT Structure Set"),
    }


def test_each_bad_input_gets_its_own_entry_naming_the_problem(tmp_path, model):
    expected = bad_inputs(tmp_path / "in")
    result = segment_folder(model, tmp_path / "in", tmp_path / "out", ("nifti",), progress=False)
    cases = {c["id"]: c for c in result["cases"]}
    assert set(cases) == set(expected)
    for ident, (status, text) in expected.items():
        assert cases[ident]["status"] == status, (ident, cases[ident])
        assert text in cases[ident]["error"], (ident, cases[ident]["error"])
    assert (tmp_path / "out" / "good" / "seg.nii.gz").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good", "manifest.json"]  # no partial outputs
    empty = segment_folder(model, tmp_path / "in" / "empty", tmp_path / "out2", ("nifti",), progress=False)
    assert [c["status"] for c in empty["cases"]] == ["failed"] and "no images" in empty["cases"][0]["error"]


def test_exit_code_is_zero_only_when_every_case_is_ok_or_skipped(tmp_path, tiny):
    write_nifti(tmp_path / "in" / "a.nii.gz", random_ct((20, 20, 8)))
    shutil.copy(pydicom_file("rtstruct.dcm"), tmp_path / "in" / "rt.dcm")
    done = cli(tiny, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--formats", "nifti")
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "in" / "b.nii.gz").write_bytes(b"\x1f\x8b broken")
    done = cli(tiny, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--formats", "nifti")
    assert done.returncode == 1 and manifest(tmp_path / "out")["b"]["status"] == "failed"


def test_resume_redoes_only_incomplete_cases(tmp_path, model):
    for name in "abc":
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", random_ct((20, 20, 8), ord(name)))
    out = tmp_path / "out"
    segment_folder(model, tmp_path / "in", out, ("nifti",), progress=False)
    stamps = {n: (out / n / "seg.nii.gz").stat().st_mtime_ns for n in "abc"}
    # an interruption: b's entry never written (killed after its file), c's output lost, a stray temp file
    data = json.loads((out / "manifest.json").read_text())
    data["cases"] = [c for c in data["cases"] if c["id"] != "b"]
    (out / "manifest.json").write_text(json.dumps(data))
    (out / "c" / "seg.nii.gz").unlink()
    (out / "c" / ".999.tmp.seg.nii.gz").write_bytes(b"half")
    time.sleep(0.01)
    result = segment_folder(model, tmp_path / "in", out, ("nifti",), resume=True, progress=False)
    cases = {c["id"]: c for c in result["cases"]}
    assert [c["status"] for c in cases.values()] == ["ok"] * 3
    assert cases["a"].get("resumed") and not cases["b"].get("resumed") and not cases["c"].get("resumed")
    assert (out / "a" / "seg.nii.gz").stat().st_mtime_ns == stamps["a"]
    assert (out / "b" / "seg.nii.gz").stat().st_mtime_ns != stamps["b"]
    assert (out / "c" / "seg.nii.gz").is_file() and not (out / "c" / ".999.tmp.seg.nii.gz").exists()


@pytest.mark.slow
def test_kill_9_leaves_only_complete_files_and_resume_finishes(tmp_path, tiny):
    for i in range(6):
        write_nifti(tmp_path / "in" / f"v{i}.nii.gz", random_ct((64, 64, 24), i))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "segment.py"), "--bundle", str(BUNDLE), "--quiet"]
    cmd += ["--overrides", json.dumps(tiny), "--input", str(tmp_path / "in"), "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").is_file() and any(c["status"] == "ok" for c in manifest(out).values()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = manifest(out)
    assert 1 <= len(before) <= 6
    for path in out.rglob("*.nii.gz"):
        if not path.name.startswith("."):
            assert np.asarray(nib.load(path).dataobj).shape == (64, 64, 24)  # complete files only
    done = cli(tiny, "--input", str(tmp_path / "in"), "--output", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    after = manifest(out)
    assert len(after) == 6 and all(c["status"] == "ok" for c in after.values())
    assert all(after[i].get("resumed") for i, c in before.items() if c["status"] == "ok")


def assert_valid_seg(path: Path, sources) -> None:
    """dciodvfy reports no Error of the SEG's own (errors about UIDs inherited from ``sources`` aside)."""
    own, _ = dciodvfy_errors(path, sources)
    assert own == [], own


@pytest.mark.slow
@pytest.mark.data
def test_real_blank_uid_series_gives_a_seg_equal_to_the_nifti_label_on_the_dicom_grid(tmp_path, model):
    from diffseg.data import data_path

    series = data_path("totalsegmentator/example_ct_dicom")
    result = segment_folder(model, series, tmp_path / "out", ("nifti", "dicom_seg"), progress=False)
    (case,) = result["cases"]
    assert case["status"] == "ok" and case["instances"] == 20, case
    img = nib.load(tmp_path / "out" / case["id"] / "seg.nii.gz")
    label = np.asarray(img.dataobj)
    assert label.shape == (512, 512, 20) and len(np.unique(label)) > 1
    files = sorted(str(p) for p in series.iterdir())
    sources, _ = read_sources(files)
    expected = label_on_dicom_grid(label, img.affine, sources)
    seg = hd.seg.segread(tmp_path / "out" / case["id"] / "seg.dcm")
    uids = [s.SOPInstanceUID for s in sources]
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(got, expected)
    assert (got > 0).sum() == (label > 0).sum()  # the same grid: every labelled voxel lands on one pixel
    assert seg.StudyInstanceUID  # derived (the source has none)
    assert_valid_seg(tmp_path / "out" / case["id"] / "seg.dcm", files)
    ref = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert ref == set(uids)


@pytest.mark.data
def test_odd_transfer_syntaxes_give_the_same_segmentation(tmp_path, tiny):
    from diffseg.data import data_path

    model = load_bundle(BUNDLE, overrides={**tiny, "pixdim": [0.5, 0.5, 5.0]})  # 64² at 0.31 mm: keep > 16 voxels

    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
             "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]  # fmt: skip
    labels = []
    for name in names:  # one run each: the six files share one SeriesInstanceUID (one series if run together)
        (tmp_path / "in" / name[:-4]).mkdir(parents=True)
        shutil.copy(data_path(f"pydicom/{name}"), tmp_path / "in" / name[:-4] / name)
        out = tmp_path / "out" / name[:-4]
        result = segment_folder(model, tmp_path / "in" / name[:-4], out, ("nifti", "dicom_seg"), progress=False)
        assert [c["status"] for c in result["cases"]] == ["ok"], result["cases"]
        labels.append(np.asarray(nib.load(out / name[:-4] / "seg.nii.gz").dataobj))
        assert hd.seg.segread(out / name[:-4] / "seg.dcm").NumberOfFrames >= 1
        assert_valid_seg(out / name[:-4] / "seg.dcm", [tmp_path / "in" / name[:-4] / name])
    assert all(np.array_equal(labels[0], other) for other in labels[1:])  # lossless codecs, same pixels


@pytest.mark.slow
@pytest.mark.data
def test_duplicate_truncated_undecodable_and_split_real_series_with_resume(tmp_path, tiny):
    from diffseg.data import data_path

    series = data_path("totalsegmentator/example_ct_dicom")
    folders, broken = copied_series(series, tmp_path / "in")
    shutil.copytree(series, tmp_path / "in" / "undecodable")
    data = (tmp_path / "in" / "undecodable" / broken).read_bytes()
    start = data.index(b"\xff\x4f\xff\x51")  # the JPEG 2000 codestream's SOC + SIZ markers: zeroed, it cannot decode
    (tmp_path / "in" / "undecodable" / broken).write_bytes(data[:start] + bytes(64) + data[start + 64 :])
    inputs = [*folders.values(), tmp_path / "in" / "undecodable"]
    coarse = {**tiny, "pixdim": [14.0, 14.0, 10.0]}  # 29 × 29 × 4 voxels: seconds per case
    out = tmp_path / "out"
    result = segment_folder(load_bundle(BUNDLE, overrides=coarse), inputs, out, ("nifti", "dicom_seg"), progress=False)
    cases = {c["id"]: c for c in result["cases"]}
    assert {k: c["status"] for k, c in cases.items()} == {
        "a": "ok", "ct": "ok", "only_copy_truncated": "failed", "split": "ok", "undecodable": "failed"
    }  # fmt: skip
    assert [n for n in cases["a"]["notes"] if n.startswith("ignored duplicate b/")] == [
        f"ignored duplicate b/{f.name}: identical copy of a/{f.name}" for f in sorted(series.iterdir())
    ]
    (dropped,) = [n for n in cases["ct"]["notes"] if n.startswith("dropped")]
    assert dropped.startswith(f"dropped other/{broken}: truncated pixel data (the file ends ")
    assert dropped.endswith(
        f"encapsulated JPEG 2000 Image Compression (Lossless Only) frames); its copy ct/{broken} is used"
    )
    assert cases["only_copy_truncated"]["error"].startswith(f"{broken}: truncated pixel data (the file ends ")
    assert cases["undecodable"]["error"].startswith(
        f"reading/preprocessing failed: undecodable: ValueError: {broken}: pixel data cannot be decoded ("
    ), cases["undecodable"]["error"]
    assert cases["split"]["input"] == [str(folders["split"] / "part1"), str(folders["split"] / "part2")]
    assert cases["a"]["input"] == str(folders["twice"] / "a") and cases["ct"]["input"] == str(
        folders["truncated_copy"] / "ct"
    )
    found = sum(1 for p in (tmp_path / "in").rglob("*") if p.is_file())
    assert result["files_found"] == found == 121 and result["skipped_files"] == []  # 40 + 21 + 20 + 20 + 20
    assert sum(c["files"] for c in result["cases"]) == found
    labels = []
    for ident in ("a", "ct", "split"):
        assert cases[ident]["instances"] == 20
        seg = hd.seg.segread(out / ident / "seg.dcm")
        assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20
        assert_valid_seg(out / ident / "seg.dcm", series.iterdir())
        labels.append(np.asarray(nib.load(out / ident / "seg.nii.gz").dataobj))
    assert labels[0].shape == (512, 512, 20) and all(np.array_equal(labels[0], other) for other in labels[1:])
    stamps = {ident: (out / ident / "seg.dcm").stat().st_mtime_ns for ident in ("a", "ct", "split")}
    resume = ["--formats", "nifti,dicom_seg", "--resume"]  # the same outputs: nothing left to write for the ok cases
    done = cli(coarse, "--input", ",".join(map(str, inputs)), "--output", str(out), *resume)
    assert done.returncode == 1, done.stderr[-2000:]  # the two broken series still fail
    after = manifest(out)
    assert {k: c["status"] for k, c in after.items()} == {k: c["status"] for k, c in cases.items()}
    assert all(after[k].get("resumed") and (out / k / "seg.dcm").stat().st_mtime_ns == t for k, t in stamps.items())
    assert after["undecodable"]["error"] == cases["undecodable"]["error"]
    assert sum(c["files"] for c in after.values()) == found


@pytest.mark.slow
def test_torchrun_two_processes_do_every_case_exactly_once(tmp_path, tiny):
    for i in range(5):
        write_nifti(tmp_path / "in" / f"v{i}.nii.gz", random_ct((24, 24, 8), i))
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += [str(REPO / "scripts" / "segment.py"), "--bundle", str(BUNDLE), "--quiet", "--formats", "nifti"]
    cmd += ["--overrides", json.dumps(tiny), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0  # the broken file fails its case → exit code 1 on its rank
    merged = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ids = [c["id"] for c in merged["cases"]]
    assert sorted(ids) == sorted([f"v{i}" for i in range(5)] + ["bad"]) and len(ids) == len(set(ids))
    assert merged["world_size"] == 2 and {c["rank"] for c in merged["cases"]} == {0, 1}
    assert all((tmp_path / "out" / f"v{i}" / "seg.nii.gz").is_file() for i in range(5))
    assert not list((tmp_path / "out").glob("manifest.rank*.json"))


OTHER_BUNDLES = {  # bundle → (CLI settings, formats): every landed bundle runs through the CLI with its shipped weights
    "segdiff_2d_segmentation": ({"steps": 3, "samples": 2}, ("nifti", "uncertainty", "png")),
    "sdseg_latent_segmentation": ({"samples": 2}, ("nifti", "dicom_seg", "uncertainty", "png")),
    "diffusion_probe_3d_segmentation": ({}, ("nifti", "dicom_seg", "png")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OTHER_BUNDLES))
def test_every_bundle_segments_a_folder_with_its_shipped_weights(tmp_path, name):
    from PIL import Image

    settings, formats = OTHER_BUNDLES[name]
    model = load_bundle(BUNDLES / name, uncertainty="uncertainty" in formats, **settings)
    folder = tmp_path / "in"
    write_nifti(folder / "vol.nii.gz", random_ct((48, 40, 12)), np.diag([1.5, 1.5, 3.0, 1.0]))
    write_ct_series(folder / "ct", slices=3)
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56), dtype=np.uint8)).save(folder / "cells.png")
    result = segment_folder(model, folder, tmp_path / "out", formats, progress=False, statistics=True)
    cases = {c["id"]: c for c in result["cases"]}
    runnable = ["cells"] if model.spatial_dims == 2 else ["vol", "ct"]
    for ident, case in cases.items():
        if ident in runnable:
            assert case["status"] == "ok", case
        elif ident == "vol":  # a 3D volume for a 2D bundle: failed, naming the problem
            assert case["status"] == "failed" and "expected a 2D image" in case["error"], case
        else:  # PNG for a 3D bundle, DICOM for a 2D one: skipped with the reason
            assert case["status"] == "skipped" and case["error"], case
    labels = set(model.classes)
    for ident in runnable:
        label = np.asarray(nib.load(tmp_path / "out" / ident / "seg.nii.gz").dataobj)
        expected = {"cells": (56, 40), "vol": (48, 40, 12), "ct": (128, 128, 3)}[ident]  # MONAI reads PNG as (W, H)
        assert label.shape == expected and set(np.unique(label)) <= labels, (ident, label.shape)
        assert (tmp_path / "out" / ident / "overlay.png").read_bytes()[:4] == b"\x89PNG"
        stats = json.loads((tmp_path / "out" / ident / "statistics.json").read_text())["classes"]
        size = "area_mm2" if model.spatial_dims == 2 else "volume_ml"
        assert sum(e["voxels"] for e in stats.values()) == int((label > 0).sum())
        assert all(size in e for e in stats.values())
        assert ("qc" in cases[ident]) == ("uncertainty" in formats)  # every uncertainty run here has 2 samples
        if "uncertainty" in formats:
            unc = np.asarray(nib.load(tmp_path / "out" / ident / "uncertainty.nii.gz").dataobj)
            assert unc.shape == expected and unc.min() >= 0 and unc.max() > 0  # two samples disagree somewhere
    if "ct" in runnable:
        seg = hd.seg.segread(tmp_path / "out" / "ct" / "seg.dcm")
        names = [s.SegmentLabel for s in seg.SegmentSequence]
        assert names == [model.classes[k] for k in sorted(model.classes) if k > 0]
        assert seg.SegmentSequence[0].SegmentAlgorithmName == name
        assert_valid_seg(tmp_path / "out" / "ct" / "seg.dcm", (folder / "ct").iterdir())


@pytest.mark.slow
def test_a_config_variant_of_the_bundle_through_the_cli(tmp_path):
    write_nifti(tmp_path / "in" / "vol.nii.gz", random_ct((32, 24, 3)))
    code = segment.main(
        str(BUNDLES / "segdiff_2d_segmentation"), str(tmp_path / "in"), str(tmp_path / "out"), steps=2, samples=2,
        formats="nifti,uncertainty", configs="inference.json,inference_slices.json", quiet=True,
    )  # fmt: skip
    assert code == 0  # without the slice-wise variant the 2D bundle fails a 3D volume (tested above)
    assert np.asarray(nib.load(tmp_path / "out" / "vol" / "seg.nii.gz").dataobj).shape == (32, 24, 3)
    unc = np.asarray(nib.load(tmp_path / "out" / "vol" / "uncertainty.nii.gz").dataobj)
    assert unc.shape == (32, 24, 3) and all(unc[..., k].max() > 0 for k in range(3))
