"""recycling_ddpm_3d_segmentation: the bundle contract, ImgX numbers, recycling, window-consistent sampling."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from bundle_testing import (
    BUNDLES,
    FEEDFORWARD,
    FIVE_ORGANS,
    bad_volume_cases,
    bad_volume_folder,
    bundle_imports,
    check_feedforward_input,
    check_metadata,
    check_net_in_out,
    check_resumable_training,
    error_text,
    infer_images,
    load_config,
    patient_b_dice,
    random_ct,
    read_nifti,
    run_bundle,
    run_torchrun,
    save_weights,
    train_and_evaluate_twin,
    write_nifti,
)

BUNDLE = "recycling_ddpm_3d_segmentation"
TINY = {"unet_channels": [4, 4, 4, 4], "roi_size": [32, 32, 16]}
CLASSES = 8
IMGX_ALPHAS_CUMPROD = [0.9999, 0.52175, 0.077992, 0.0033189, 3.995e-5]
IMGX_FIXED_LARGE = [1.0e-4, 0.478, 0.851, 0.957, 0.988]
FLOORS = {"liver": 0.80, "aorta": 0.50}


def tiny_weights(tmp_path, **override) -> str:
    """A random tiny network's plain state_dict (what the shipped model.pt is, at demo size)."""
    with bundle_imports(BUNDLE):
        net = load_config(BUNDLE, **{**TINY, **override}).get_parsed_content("network_def")
    return save_weights(net, tmp_path / "tiny.pt")


def infer(tmp_path, images: dict[str, tuple[np.ndarray, np.ndarray]], **override):
    ckpt = override.pop("ckpt_path", None) or tiny_weights(tmp_path)
    return infer_images(BUNDLE, tmp_path, images, **{**TINY, "ckpt_path": ckpt, **override})


def test_metadata_and_network_contract():
    check_metadata(BUNDLE)
    check_net_in_out(BUNDLE, **TINY)


def test_shipped_weights_are_a_plain_state_dict_matching_the_config():
    state = torch.load(BUNDLES / BUNDLE / "models" / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())
    with bundle_imports(BUNDLE):
        net = load_config(BUNDLE).get_parsed_content("network_def")
    net.load_state_dict(state)  # strict: the default inference.json is the shipped network
    assert (BUNDLES / BUNDLE / "models" / "model.pt").stat().st_size < 20e6


def test_schedule_is_imgx_respacing_in_training_and_inference():
    for configs in (["inference.json"], ["train.json"]):
        with bundle_imports(BUNDLE):
            sched = load_config(BUNDLE, configs).get_parsed_content("scheduler")
        np.testing.assert_allclose(sched.alphas_cumprod64.numpy(), IMGX_ALPHAS_CUMPROD, rtol=2e-4)
        np.testing.assert_allclose(sched.variances().numpy(), IMGX_FIXED_LARGE, rtol=2e-3)
        sched.set_timesteps(5)
        assert sched.timesteps.tolist() == [4, 3, 2, 1, 0]


def test_ablation_overrides_change_what_they_name():
    def parsed(ablation, item):
        with bundle_imports(BUNDLE):
            return load_config(BUNDLE, ["train.json", ablation]).get_parsed_content(item)

    loss = parsed("ablation_noise_prediction.json", "loss")
    assert loss.mse_weight == pytest.approx(0.1) and not loss.logits_output
    assert parsed("ablation_noise_prediction.json", "scheduler").prediction_type == "epsilon"
    assert parsed("ablation_no_dice.json", "loss").dice_weight == 0.0
    assert parsed("ablation_no_recycling.json", "train#prepare_batch").recycling is False
    long = parsed("ablation_1000_steps.json", "network_def")
    assert long.scheduler.num_train_timesteps == 1001 and long.num_inference_steps == 5
    long.scheduler.set_timesteps(5)
    assert long.scheduler.timesteps.tolist() == [1000, 750, 500, 250, 0]  # the same 5 ᾱ as the respaced chain
    np.testing.assert_allclose(long.scheduler.alphas_cumprod64[[0, 250, 500, 750, 1000]], IMGX_ALPHAS_CUMPROD, 2e-4)


def test_intensity_augmentation_changes_only_the_image_and_is_off_by_default():
    """``intensity_prob`` drives the histogram shift, scale, shift, gamma, smoothing and noise of the training patches;
    at the default 0 the random transforms after the crop leave the intensities alone."""
    image = torch.linspace(0, 1, 32 * 32 * 16).reshape(1, 32, 32, 16)
    label = torch.zeros(1, 32, 32, 16, dtype=torch.long)
    label[:, 8:24, 8:24, 4:12] = 2
    results = {}
    for prob in (0.0, 1.0):
        with bundle_imports(BUNDLE):
            parser = load_config(BUNDLE, ["train.json"], intensity_prob=prob, rotate_range=0.0, scale_range=0.0,
                                 translate_range=0.0)  # fmt: skip
            transforms = parser.get_parsed_content("train#random_transforms")[2:]  # after the crop and the pad
        from monai.transforms import Compose

        results[prob] = Compose(transforms).set_random_state(0)({"image": image.clone(), "label": label.clone()})
    for out in results.values():
        torch.testing.assert_close(torch.as_tensor(out["label"]).long(), label, rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(results[0.0]["image"]), image, rtol=0, atol=1e-6)
    assert float((torch.as_tensor(results[1.0]["image"]) - image).abs().mean()) > 0.01


def test_pad_size_puts_the_volume_on_an_air_canvas_before_the_crop():
    """``pad_size`` (in-plane canvas; 0 = none, the default) pads the cached volume with air (0 after the HU window) and
    background before the class-balanced crop, so that patches of a tight field of view also show the body's edge."""
    image = torch.rand(1, 20, 12, 10) * 0.5 + 0.5
    label = torch.ones(1, 20, 12, 10, dtype=torch.long)
    for pad_size, shape in (([0, 0, 0], (20, 12, 10)), ([24, 24, 0], (24, 24, 10))):
        with bundle_imports(BUNDLE):
            transforms = load_config(BUNDLE, ["train.json"], pad_size=pad_size).get_parsed_content(
                "train#deterministic_transforms"
            )
        (pad,) = [t for t in transforms if type(t).__name__ == "SpatialPadd"]
        out = pad({"image": image.clone(), "label": label.clone()})
        assert tuple(out["image"].shape[1:]) == shape and tuple(out["label"].shape[1:]) == shape
        assert float(out["image"].sum()) == pytest.approx(float(image.sum()), rel=1e-6)  # the canvas is air: 0
        assert int(out["label"].sum()) == int(label.sum())  # and background
    with bundle_imports(BUNDLE):
        demo = load_config(BUNDLE, ["train.json", "train_demo.json"]).get_parsed_content("pad_size")
    assert demo[:2] == [192, 192]  # ≥ patient A's 122 × 101 voxels at 3 mm, B's 167² field of view fits


def test_folder_inference_keeps_the_original_geometry_and_writes_uncertainty(tmp_path):
    lps = np.diag([-2.0, -2.0, 6.0, 1.0])
    lps[:3, 3] = [40.0, 30.0, -20.0]
    images = {
        "a.nii.gz": (random_ct((40, 30, 12)), np.diag([2.0, 2.0, 6.0, 1.0])),
        "b.nii": (random_ct((21, 33, 9), 1), lps),
    }
    out = infer(tmp_path, images, save_uncertainty=True, **{"displayable_configs#num_samples": 2})
    for name, (array, affine) in images.items():
        stem = name.split(".")[0]
        label, label_affine = read_nifti(out / f"{stem}_seg.nii.gz")
        assert label.shape == array.shape and label.dtype == np.uint8
        np.testing.assert_allclose(label_affine, affine, atol=1e-4)
        assert set(np.unique(label)) <= set(range(CLASSES))
        unc, _ = read_nifti(out / f"{stem}_uncertainty.nii.gz")
        assert unc.shape == array.shape and unc.min() >= 0 and unc.max() > 0  # 2 samples disagree somewhere


def test_same_seed_gives_an_identical_label_file(tmp_path):
    images = {"a.nii.gz": (random_ct((64, 64, 10)), np.diag([1.5, 1.5, 5.0, 1.0]))}
    ckpt = tiny_weights(tmp_path)
    first = infer(tmp_path / "1", images, ckpt_path=ckpt)
    second = infer(tmp_path / "2", images, ckpt_path=ckpt)
    a, b = nib.load(first / "a_seg.nii.gz"), nib.load(second / "a_seg.nii.gz")
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    third = infer(tmp_path / "3", images, ckpt_path=ckpt, **{"displayable_configs#seed": 1})
    assert not np.array_equal(np.asarray(a.dataobj), np.asarray(nib.load(third / "a_seg.nii.gz").dataobj))


@pytest.mark.parametrize(("case", "match"), bad_volume_cases())
def test_bad_inputs_fail_with_a_clear_error_naming_the_file(tmp_path, case, match):
    target = bad_volume_folder(tmp_path, case)
    with pytest.raises(Exception) as info:
        infer(tmp_path, {}, dataset_dir=str(target))
    assert match in error_text(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


class PerVoxel(nn.Module):
    """A per-voxel stand-in for the U-Net: output(v) depends only on the input at voxel v and on t."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)
        self.time = nn.Embedding(5, out_channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 3 + self.time(timesteps)[:, :, None, None, None]


def test_window_consistent_sampling_has_no_seams(tmp_path):
    """A volume larger than the window: the bundle's default inferer equals one whole-volume chain."""
    with bundle_imports(BUNDLE):
        window = {"displayable_configs#num_samples": 2, "displayable_configs#sw_overlap": 0.5}
        parser = load_config(BUNDLE, roi_size=[16, 16, 16], **window)
        seg, inferer = parser.get_parsed_content("network_def"), parser.get_parsed_content("inferer")
    seg.denoiser.net = PerVoxel(1 + CLASSES, CLASSES)
    image = torch.rand(1, 1, 40, 24, 20)
    whole = seg(image)
    windowed = inferer(image, seg)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)
    with bundle_imports(BUNDLE):
        per_window = load_config(BUNDLE, roi_size=[16, 16, 16], **{"displayable_configs#window_consistent": False})
        chains = per_window.get_parsed_content("inferer")(image, seg)
    assert (chains - whole).abs().max() > 1e-2  # the Diff-UNet option does disagree across windows


def write_dataset(root, n=2):
    """n tiny labelled volumes (a bright box = class 1, a dark box = class 2) and an MSD dataset.json."""
    entries = []
    for i in range(n):
        image, label = random_ct((40, 40, 20), i), np.zeros((40, 40, 20), np.uint8)
        image[8:20, 8:20, 4:12], label[8:20, 8:20, 4:12] = 300, 1
        image[24:34, 20:30, 8:16], label[24:34, 20:30, 8:16] = -800, 2
        affine = np.diag([1.5, 1.5, 5.0, 1.0])
        write_nifti(root / f"img{i}.nii.gz", image, affine)
        write_nifti(root / f"lab{i}.nii.gz", label, affine)
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries, "validation": entries[:1]}))


def train_common(tmp_path: Path) -> dict:
    """Overrides of a 2-iteration training on :func:`write_dataset`'s volumes in ``tmp_path / "data"``."""
    return {**TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "eval"), "patch_size": [32, 32, 16], "cache_rate": 0.0}  # fmt: skip


def test_two_training_iterations_then_evaluate(tmp_path):
    write_dataset(tmp_path / "data")
    common = train_common(tmp_path)
    trainer = run_bundle(BUNDLE, ["train.json"], max_epochs=1, val_interval=1, **common)  # 2 volumes = 2 iterations
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values()) and any(k.startswith("denoiser.net.") for k in state)
    del trainer
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], ckpt_path=str(tmp_path / "ckpt" / "model.pt"), **common)
    metrics = (tmp_path / "eval" / "metrics.csv").read_text()
    for name in ("val_mean_dice", "val_hd95", "val_ece"):
        assert name in metrics
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").exists()


def test_training_stops_resumes_and_ships_ema_weights(tmp_path):
    write_dataset(tmp_path / "data")
    check_resumable_training(BUNDLE, ["train.json"], val_interval=1, ema_decay=0.5, **train_common(tmp_path))


def test_recycling_first_pass_has_no_gradient_and_the_second_trains(tmp_path):
    write_dataset(tmp_path / "data", n=1)
    with bundle_imports(BUNDLE):
        parser = load_config(
            BUNDLE,
            ["train.json"],
            **TINY,
            dataset_dir=str(tmp_path / "data"),
            ckpt_dir=str(tmp_path),
            patch_size=[32, 32, 16],
            max_epochs=1,
        )
        trainer = parser.get_parsed_content("train#trainer")
    grad_modes = []
    trainer.network.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.run()
    assert grad_modes == [False, True]  # recycled prediction without gradient, then the training pass
    after = trainer.network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_feedforward_twin_trains_on_noise_and_evaluates_its_own_weights(tmp_path):
    """train_feedforward.json (paper 001, E1): no recycling, one call on noise at t = 4, CE + foreground Dice, one
    x0 step at inference; its weights go to model_feedforward.pt, which evaluate.json then reads."""
    write_dataset(tmp_path / "data")
    common = train_common(tmp_path)
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, FEEDFORWARD, **common)
        loss, seg = parser.get_parsed_content("loss"), parser.get_parsed_content("network_def")
    assert parser["recycling"] is False and loss.logits_output and loss.mse_weight == 0
    assert loss.dice_weight == 1 and loss.ce_weight == 1
    assert seg.num_inference_steps == 1 and seg.num_samples == 1 and seg.scheduler.prediction_type == "sample"
    label = torch.zeros(1, 1, 32, 32, 16, dtype=torch.long)
    label[..., 4:20, 4:20, 2:10] = 2
    x, target, _, kwargs = check_feedforward_input(BUNDLE, {"image": torch.rand(1, 1, 32, 32, 16), "label": label})
    assert x.shape == (1, CLASSES, 32, 32, 16) and kwargs["timesteps"].tolist() == [4]
    train_and_evaluate_twin(BUNDLE, tmp_path / "eval" / "metrics.csv", max_epochs=1, val_interval=1, **common)
    with bundle_imports(BUNDLE):
        infer_seg = load_config(BUNDLE, ("inference.json", "inference_feedforward.json"), **TINY).get_parsed_content(
            "network_def"
        )
    infer_seg.load_state_dict(torch.load(tmp_path / "ckpt" / "model_feedforward.pt", weights_only=True))
    assert infer_seg.num_inference_steps == 1 and infer_seg.scheduler.prediction_type == "sample"


@pytest.mark.slow
@pytest.mark.data
def test_demo_weights_segment_patient_b(tmp_path):
    """The shipped weights on the real DICOM series of patient B (demo.json, what `make demo` runs)."""
    run_bundle(BUNDLE, ["inference.json", "demo.json"], output_dir=str(tmp_path))
    (out,) = tmp_path.glob("*_seg.nii.gz")
    label = nib.load(out)
    assert label.shape == (512, 512, 20)
    values, counts = np.unique(np.asarray(label.dataobj), return_counts=True)
    assert set(values.tolist()) <= set(range(CLASSES)) and {0, 2}.issubset(set(values.tolist()))
    assert counts[values.tolist().index(2)] > 100_000  # liver: 230k voxels measured (pseudo-label: 367k)


@pytest.fixture(scope="module")
def b_dice(tmp_path_factory) -> dict[str, float]:
    """The shipped weights' per-class Dice on patient B, inference defaults (5 steps, 1 sample, seed 0)."""
    return patient_b_dice(BUNDLE, tmp_path_factory.mktemp("patient_b"))


@pytest.mark.slow
@pytest.mark.data
def test_shipped_weights_meet_the_patient_b_floors(b_dice):
    """Issue 16's floors: liver ≥ 0.80, aorta ≥ 0.50 and the five-organ mean ≥ 0.50 (the spleen's: below)."""
    for organ, floor in FLOORS.items():
        assert b_dice[organ] >= floor, (organ, b_dice)
    assert np.mean([b_dice[o] for o in FIVE_ORGANS]) >= 0.50, b_dice


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.xfail(
    strict=True,
    reason="the 0.3.0 weights (3,600 iterations, 138 of 150 minutes) give spleen Dice 0.443; the spleen swings "
    "between 0.09 and 0.57 over the run's validations from 30 minutes on, while the feed-forward twin's settles at "
    "0.58-0.70 from 70 minutes on (0.656 at the end; issue 16)",
)
def test_shipped_weights_meet_the_spleen_floor(b_dice):
    """Issue 16's spleen floor: Dice ≥ 0.60 on patient B."""
    assert b_dice["spleen"] >= 0.60, b_dice


@pytest.mark.slow
@pytest.mark.data
def test_shipped_feedforward_twin_on_patient_b(tmp_path):
    """The twin (models/model_feedforward.pt, same recipe and budget): the card's spleen 0.656 and five-organ mean
    0.541 — the spleen floor is within reach of this data and network, and paper 001's ~0.02 gap is measurable."""
    twin = patient_b_dice(BUNDLE, tmp_path, extra=FEEDFORWARD[1:])
    assert twin["spleen"] >= 0.60, twin
    assert np.mean([twin[o] for o in FIVE_ORGANS]) >= 0.52, twin


@pytest.mark.slow
def test_two_process_training_with_torchrun_on_cpu(tmp_path):
    """multi_gpu_train.json: DDP with the gloo backend on CPU, 2 processes, rank 0 saves the checkpoint."""
    write_dataset(tmp_path / "data", n=2)
    run_torchrun(
        BUNDLE,
        tmp_path,
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        max_epochs=1,
        unet_channels=[4, 4, 4, 4],
        patch_size=[32, 32, 16],
        val_interval=0,
        cache_rate=0,
    )
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the plain segmenter's keys, loadable by inference.json
