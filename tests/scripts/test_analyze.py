"""scripts/analyze.py on a tiny recycling-DDPM bundle network and a tiny labelled volume; qc-threshold with the folder
engine on two volumes, checked against the files it wrote."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "bundles"),
    str(Path(__file__).resolve().parents[2] / "scripts"),
]
import analyze  # noqa: E402
from bundle_testing import BUNDLES, bundle_imports, load_config, random_ct, save_weights, write_nifti  # noqa: E402

BUNDLE = BUNDLES / "recycling_ddpm_3d_segmentation"
TINY = {"unet_channels": [4, 4, 4, 4], "roi_size": [32, 32, 16], "cache_rate": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    image, label = random_ct((40, 36, 18)), np.zeros((40, 36, 18), np.uint8)
    image[8:20, 8:20, 4:12], label[8:20, 8:20, 4:12] = 300, 1
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    write_nifti(root / "img.nii.gz", image, affine)
    write_nifti(root / "lab.nii.gz", label, affine)
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    (root / "dataset.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    with bundle_imports(BUNDLE):
        net = load_config(BUNDLE.name, ["train.json"], **TINY).get_parsed_content("network_def")
    ckpt = save_weights(net, root / "tiny.pt")
    return root, ckpt, {**TINY, "dataset_dir": str(root)}


def rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fingerprint_writes_both_curves_over_the_timestep_grid(setup, tmp_path):
    root, ckpt, override = setup
    out = analyze.fingerprint(str(BUNDLE), str(tmp_path), draws=1, ckpt=ckpt, override=override)
    assert [(r["condition"], r["t"]) for r in out] == [
        (c, t) for c in ("conditioned", "unconditioned") for t in range(5)
    ]
    assert all(r["mse"] >= 0 and 0 <= r["dice"] <= 1 for r in out)
    assert len(rows(tmp_path / "fingerprint.csv")) == 10
    with Image.open(tmp_path / "fingerprint.png") as img:
        assert img.format == "PNG"


def test_calibration_stability_and_compare(setup, tmp_path):
    root, ckpt, override = setup
    override = {**override, "validate#inferer#roi_size": [32, 32, 16]}
    report = analyze.calibration(str(BUNDLE), str(tmp_path / "cal"), samples=2, ckpt=ckpt, override=override)
    assert len(report["bins"]["counts"]) == 10 and len(report["per_image"]) == 1
    assert sum(report["bins"]["counts"]) == report["voxels"] > 0  # every voxel lands in one bin
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["samples"] == 2
    stable = analyze.stability(str(BUNDLE), str(tmp_path / "st"), seeds=[0, 0], ckpt=ckpt, override=override)
    assert stable[0]["dice"] == pytest.approx(1.0) and stable[0]["ssim"] == pytest.approx(1.0, abs=1e-5)
    table = analyze.compare(str(BUNDLE), str(tmp_path / "cmp"), ckpt, ckpt, override=override)
    assert [r["model"] for r in table] == ["diffusion", "feed-forward"]
    assert table[0]["dice"] == table[1]["dice"]  # the same weights and settings give the same scores
    assert len(rows(tmp_path / "cmp" / "compare.csv")) == 2


def test_ensemble_sizes_from_one_run_equal_the_segmenters_own_ensemble(setup, tmp_path):
    root, ckpt, override = setup
    override = {**override, "validate#inferer#roi_size": [32, 32, 16]}
    summary = analyze.ensemble(str(BUNDLE), str(tmp_path), samples=[2, 1], seeds=[0, 0], ckpt=ckpt, override=override)
    assert [r["samples"] for r in summary] == [1, 2] and all(r["dice_std"] == 0 for r in summary)  # same seed twice
    table = rows(tmp_path / "ensemble.csv")
    assert [(r["seed"], r["samples"]) for r in table] == [("0", "1"), ("0", "2")] * 2
    report = analyze.calibration(str(BUNDLE), str(tmp_path / "cal"), samples=2, ckpt=ckpt, override=override)
    assert summary[1]["dice_mean"] == pytest.approx(report["per_image"][0]["dice"])  # mean of its 2 sample maps
    for n in (1, 2):
        with Image.open(tmp_path / f"calibration_N{n}.png") as img:
            assert img.format == "PNG"


def test_otsu_baseline_finds_the_bright_box_and_its_ece_is_the_error_rate(setup, tmp_path):
    _, _, override = setup
    rng = np.random.default_rng(1)
    label = np.zeros((40, 36, 18), np.uint8)
    label[8:20, 8:20, 4:12] = 1
    image = np.where(label > 0, 100.0, -700.0) + rng.normal(0, 20, label.shape)
    image.reshape(-1)[rng.choice(np.flatnonzero(label == 0), 100, replace=False)] = 100.0  # 100 bright outliers
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    write_nifti(tmp_path / "img.nii.gz", image.astype(np.float32), affine)
    write_nifti(tmp_path / "lab.nii.gz", label, affine)
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    override = {**override, "dataset_dir": str(tmp_path)}
    result = analyze.otsu(str(BUNDLE), str(tmp_path / "out"), override=override)
    (row,) = rows(tmp_path / "out" / "otsu.csv")
    assert result["dice"] == pytest.approx(float(row["dice"])) and 0.9 < result["dice"] < 1.0
    with analyze.bundle_imports(BUNDLE.resolve()):
        parser = analyze.bundle_parser(BUNDLE.resolve(), ["train.json"], **override)
        item = parser.get_parsed_content("validate#dataset")[0]
    image, label = np.asarray(item["image"])[:1], np.asarray(item["label"])[0] > 0
    from skimage.filters import threshold_otsu

    error = ((image[0] > threshold_otsu(image)) != label).mean()
    assert error > 0 and result["ece"] == pytest.approx(error, abs=1e-6)  # a {0, 1} map: as overconfident as wrong


def test_score_counts_dice_per_class_of_a_png_region_and_of_binarised_instances(tmp_path, capsys):
    ref = np.zeros((20, 30), np.uint8)
    ref[2:6, 2:6], ref[10:14, 20:28] = 1, 2  # two instances / classes, the second in columns 20-27
    pred = ref.copy()
    pred[10:14, 20:24] = 0  # half of the second one missed
    Image.fromarray(ref).save(tmp_path / "ref.png")
    write_nifti(tmp_path / "pred.nii.gz", pred.T, np.eye(4))  # PNG readers store (x, y): a written label is (x, y)
    out = analyze.score(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.png"))
    assert out[1] == {"dice": 1.0, "iou": 1.0, "voxels": 16}
    assert out[2]["dice"] == pytest.approx(2 * 16 / (16 + 32)) and out[2]["iou"] == pytest.approx(0.5)
    assert "class 2: Dice 0.6667  IoU 0.5000  reference voxels 32" in capsys.readouterr().out
    right = analyze.score(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.png"), region="20:30", binary=True)
    assert list(right) == [1] and right[1]["voxels"] == 32 and right[1]["dice"] == pytest.approx(2 / 3)
    write_nifti(tmp_path / "small.nii.gz", pred[:10].T, np.eye(4))
    with pytest.raises(ValueError, match=r"shape \(30, 10\) but .*ref.png has \(30, 20\)"):
        analyze.score(str(tmp_path / "small.nii.gz"), str(tmp_path / "ref.png"))


def test_score_compares_volumes_of_one_grid_stored_in_different_orientations(tmp_path):
    """A DICOM-grid output (RAS affine) against an LAS reference of the same voxels: compared in RAS, Dice 1."""
    ref = np.zeros((8, 6, 4), np.uint8)
    ref[1:3, 1:5, 0:2] = 1  # left-right asymmetric
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    las = ras.copy()
    las[0, 0], las[0, 3] = -2.0, 14.0  # x flipped: voxel i of LAS is voxel 7 - i of RAS
    write_nifti(tmp_path / "pred.nii.gz", ref, ras)
    write_nifti(tmp_path / "ref.nii.gz", ref[::-1].copy(), las)
    assert analyze.score(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"))[1]["dice"] == 1.0
    write_nifti(tmp_path / "ref_wrong.nii.gz", ref, las)  # the same array in LAS is the mirror image
    assert analyze.score(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref_wrong.nii.gz"))[1]["dice"] == 0.0


def test_help_documents_each_analysis():
    for name in ("fingerprint", "calibration", "compare", "stability", "ensemble", "otsu"):
        text = fire.helptext.HelpText(getattr(analyze, name), trace=fire.trace.FireTrace(None, name=name))
        assert "BUNDLE" in text and "OUTPUT" in text and getattr(analyze, name).__doc__.split()[0] in text


def test_curves_draws_runs_and_reports_best_and_final(tmp_path, capsys):
    paths = []
    for name, dice in (("diffusion", [0.2, 0.6, 0.5]), ("twin", [0.3, 0.4, 0.45])):
        path = tmp_path / name / "curve.csv"
        path.parent.mkdir()
        lines = ["wall_seconds,iteration,epoch,loss,lr,val_mean_dice"]
        lines += [f"{60 * i + 30},{10 * i + 5},{i},{1.0 / (i + 1)},0.001," for i in range(3)]
        lines += [f"{60 * (i + 1)},{10 * (i + 1)},{i + 1},,0.001,{d}" for i, d in enumerate(dice)]
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    table = analyze.curves(",".join(paths), str(tmp_path / "both.png"), labels="diffusion,feed-forward")
    assert [r["run"] for r in table] == ["diffusion", "feed-forward"]
    assert table[0]["best"] == 0.6 and table[0]["best_minutes"] == 2.0 and table[0]["final"] == 0.5
    assert table[1]["best"] == table[1]["final"] == 0.45 and table[1]["final_iteration"] == 30
    assert table[0]["seconds_per_iteration"] == 6.0
    assert "| diffusion | 0.6000 | 2.0 | 0.5000 | 3.0 | 30 | 6.00 |" in capsys.readouterr().out
    with Image.open(tmp_path / "both.png") as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="2 runs but 1 labels"):
        analyze.curves(paths, str(tmp_path / "x.png"), labels="one")
    # several columns: their mean per validation; a row without all of them is no validation of the mean
    organs = tmp_path / "organs.csv"
    organs.write_text(
        "wall_seconds,iteration,val_dice_liver,val_dice_spleen\n60,10,0.8,0.2\n120,20,0.9,\n180,30,0.7,0.5\n"
    )
    (row,) = analyze.curves(str(organs), str(tmp_path / "mean.png"), metric="val_dice_liver,val_dice_spleen")
    assert row["best"] == pytest.approx(0.6) and row["best_minutes"] == 3.0 and row["final"] == pytest.approx(0.6)
    (row,) = analyze.curves(str(organs), str(tmp_path / "first.png"), metric="val_dice_liver,val_dice_spleen,loss")
    assert np.isnan(row["best"]) and row["final_iteration"] == 30


def test_qc_threshold_is_the_95th_percentile_of_the_slices_in_the_written_files(tmp_path, tiny, capsys):
    from diffseg.deploy import load_bundle

    bundle = tmp_path / "bundle"  # a copy: --write edits its metadata.json
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    cases = {name: random_ct((40, 36, 12), seed) for seed, name in enumerate(("a", "b"))}
    for name, array in cases.items():
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", array, np.diag([3.0, 3.0, 3.0, 1.0]))
    inputs = ",".join(str(tmp_path / "in" / f"{n}.nii.gz") for n in cases)
    out = tmp_path / "out"
    result = analyze.qc_threshold(str(bundle), inputs, samples=3, write=True, output=str(out), override=tiny)
    values = []
    for name in cases:  # axial slices (axis 2 of these RAS files) with ≥ 50 predicted foreground voxels
        label = np.asarray(nib.load(out / name / "seg.nii.gz").dataobj)
        unc = np.asarray(nib.load(out / name / "uncertainty.nii.gz").dataobj)
        values += [unc[..., k][label[..., k] > 0].mean() for k in range(12) if (label[..., k] > 0).sum() >= 50]
    assert len(values) == len(result["regions"]) >= 10
    value = result["qc_threshold"]["std"]
    assert value == pytest.approx(np.percentile(values, 95), rel=1e-5) and min(values) < value <= max(values)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["qc_threshold"] == {"std": value}
    assert meta["qc_threshold_source"].startswith(
        f'python scripts/analyze.py qc-threshold --bundle bundles/bundle --input "{inputs}" --samples 3 --write'
    )
    assert (
        meta["network_data_format"]
        == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    )
    assert load_bundle(bundle, overrides=tiny, samples=3, uncertainty=None).qc_threshold == value  # what the CLI uses
    printed = capsys.readouterr().out
    assert f"qc_threshold std = {value}" in printed and "case a: qc disagreement" in printed
    with pytest.raises(ValueError, match="at least 2 samples"):
        analyze.qc_threshold(str(bundle), inputs, samples=1)
    with pytest.raises(ValueError, match="no uncertainty map"):
        analyze.qc_threshold(str(BUNDLES / "diffusion_probe_3d_segmentation"), inputs)
