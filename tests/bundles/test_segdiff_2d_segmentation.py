"""bundles/segdiff_2d_segmentation: the bundle contract plus SegDiff's own facts (issue #4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from bundle_testing import (
    BUNDLES,
    FEEDFORWARD,
    REPO,
    bundle_imports,
    check_feedforward_input,
    check_metadata,
    check_net_in_out,
    check_resumable_training,
    dice,
    load_config,
    read_nifti,
    run_bundle,
    run_torchrun,
    train_and_evaluate_twin,
    write_nifti,
)
from PIL import Image

from diffseg import BinaryCodec, DDPMSampler, DiffusionSegmenter
from diffseg.curves import read_curve
from diffseg.denoiser import ConditionalDenoiser
from diffseg.sliding import WindowConsistentInferer

BUNDLE = "segdiff_2d_segmentation"
ROOT = BUNDLES / BUNDLE
TINY = {  # a network of a few thousand parameters
    "unet_channels": [8, 8],
    "attention_levels": [False, False],
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "rrdb_blocks": 1,
    "rrdb_features": 8,
    "rrdb_growth": 4,
    "roi_size": [32, 32],
}


def tiny_denoiser(**kw):
    with bundle_imports(BUNDLE):
        from scripts.network import SegDiffDenoiser

        torch.manual_seed(0)
        args = {"image_channels": 1, "channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 4}
        args.update({"num_head_channels": 8, "rrdb_blocks": 1, "rrdb_features": 8, "rrdb_growth": 4, **kw})
        return SegDiffDenoiser(**args)


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Small random values in the zero-initialised parameters (MONAI zero-initialises the U-Net's output conv and
    the second conv of every residual block), so the network's output depends on its inputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn_like(p) * 0.05)
    return module


def blobs(shape=(32, 40), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic nuclei image (uint8) and its binary mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(4):
        cy, cx = rng.integers(4, shape[0] - 4), rng.integers(4, shape[1] - 4)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 16
    image = np.clip(mask * 120 + rng.normal(30, 10, shape), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


# ---- contract: inference ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The segmenter state_dict of the tiny network, as training would save it (keys ``denoiser.*``)."""
    parser = load_config(BUNDLE, ("inference.json",), **TINY)
    with bundle_imports(BUNDLE):
        net = parser.get_parsed_content("network_def")
    randomize(net)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    image, _ = blobs()
    Image.fromarray(image).save(folder / "grey.png")
    Image.fromarray(np.stack([image] * 3, -1)).save(folder / "rgb.png")
    tifffile.imwrite(folder / "grey.tif", image.astype(np.uint16))
    write_nifti(folder / "grey.nii.gz", image.astype(np.float32), np.diag([0.5, 0.7, 1.0, 1.0]))
    return folder


def error_chain(excinfo) -> str:
    """The messages of an exception and of every exception it was raised from."""
    texts, err = [], excinfo.value
    while err is not None:
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


def infer(folder, out, ckpt, configs=("inference.json",), **override):
    args = {"dataset_dir": str(folder), "output_dir": str(out), "ckpt_path": str(ckpt), **TINY}
    args.update({"displayable_configs#num_inference_steps": 3, "displayable_configs#num_samples": 2, **override})
    run_bundle(BUNDLE, configs, **args)


def test_inference_writes_label_and_uncertainty_per_image(tmp_path, image_folder, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for src, dst in (("grey.png", "a.png"), ("grey.tif", "b.tif"), ("grey.nii.gz", "c.nii.gz")):
        (folder / dst).write_bytes((image_folder / src).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    infer(folder, tmp_path / "out", tiny_checkpoint)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{s}_{k}.nii.gz" for s in "abc" for k in ("seg", "uncertainty")]
    for stem in "abc":
        seg = nib.load(tmp_path / "out" / f"{stem}_seg.nii.gz")
        unc = np.asarray(nib.load(tmp_path / "out" / f"{stem}_uncertainty.nii.gz").dataobj)
        assert seg.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
        assert sorted(seg.shape) == [32, 40] and unc.shape == seg.shape  # PNG/TIFF readers give (x, y)
        assert unc.dtype == np.float32 and unc.min() >= 0 and unc.max() <= 0.5 and unc.max() > 0


def test_nifti_geometry_and_same_seed_same_file(tmp_path, image_folder, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "grey.nii.gz").write_bytes((image_folder / "grey.nii.gz").read_bytes())
    outs = []
    for run in ("a", "b"):
        infer(folder, tmp_path / run, tiny_checkpoint)
        outs.append(read_nifti(tmp_path / run / "grey_seg.nii.gz"))
    (seg, affine), (seg2, _) = outs
    src = nib.load(folder / "grey.nii.gz")
    assert seg.shape == src.shape
    np.testing.assert_allclose(affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(seg, seg2)
    assert (tmp_path / "a" / "grey_seg.nii.gz").read_bytes() == (tmp_path / "b" / "grey_seg.nii.gz").read_bytes()


def test_rgb_input_through_image_channels(tmp_path, image_folder, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "rgb.png").write_bytes((image_folder / "rgb.png").read_bytes())
    parser = load_config(BUNDLE, ("inference.json",), **TINY, image_channels=3, image_mean=[30] * 3, image_std=[20] * 3)
    with bundle_imports(BUNDLE):
        net = randomize(parser.get_parsed_content("network_def"))
    ckpt = tmp_path / "rgb.pt"
    torch.save(net.state_dict(), ckpt)
    infer(folder, tmp_path / "out", ckpt, image_channels=3, image_mean=[30] * 3, image_std=[20] * 3)
    seg, _ = read_nifti(tmp_path / "out" / "rgb_seg.nii.gz")
    assert sorted(seg.shape) == [32, 40]
    with pytest.raises(Exception) as excinfo:
        infer(folder, tmp_path / "out1", tiny_checkpoint)
    assert "rgb.png: expected 1 channel(s), got 3" in error_chain(excinfo)


@pytest.mark.parametrize("case", ["corrupt", "wrong_dims", "missing"])
def test_bad_inputs_give_errors_naming_the_file(tmp_path, tiny_checkpoint, case):
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "corrupt":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        match = "broken.png"
    elif case == "wrong_dims":
        write_nifti(folder / "volume.nii.gz", np.zeros((16, 16, 8), np.float32))
        match = "volume.nii.gz: expected a 2D image"
    else:
        folder = tmp_path / "nowhere"
        match = "nowhere"
    with pytest.raises(Exception) as excinfo:
        infer(folder, tmp_path / "out", tiny_checkpoint)
    assert match in error_chain(excinfo)


def test_slice_wise_3d_option(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    vol = np.stack([blobs(seed=s)[0] for s in range(3)], -1).astype(np.float32)
    write_nifti(folder / "vol.nii.gz", vol)
    infer(folder, tmp_path / "out", tiny_checkpoint, configs=("inference.json", "inference_slices.json"))
    seg, affine = read_nifti(tmp_path / "out" / "vol_seg.nii.gz")
    assert seg.shape == vol.shape and set(np.unique(seg)) <= {0, 1}
    np.testing.assert_allclose(affine, nib.load(folder / "vol.nii.gz").affine)
    unc, unc_affine = read_nifti(tmp_path / "out" / "vol_uncertainty.nii.gz")  # stitched over every slice batch
    assert unc.shape == vol.shape and all(unc[..., k].max() > 0 for k in range(3)) and unc.max() <= 0.5 + 1e-6
    np.testing.assert_allclose(unc_affine, affine)


# ---- contract: metadata, network, training, evaluation ------------------------------------------------------------
def test_metadata_and_net_in_out():
    check_metadata(BUNDLE)
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "nucleus"}
    assert meta["eval_metrics"], "metadata must carry the measured demo metrics"
    check_net_in_out(BUNDLE, **TINY, **{"displayable_configs#num_inference_steps": 2})


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    items = []
    for i in range(5):
        image, mask = blobs((32, 32), seed=i)
        for kind, arr in (("image", image), ("label", mask)):
            (root / kind).mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / kind / f"{i}.png")
        items.append({"image": f"image/{i}.png", "label": f"label/{i}.png"})
    (root / "dataset.json").write_text(json.dumps({"training": items[:4], "validation": items[4:]}))
    return root


def train_args(root: Path, ckpt_dir: Path) -> dict:
    return {
        **TINY,
        "dataset_dir": str(root),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(ckpt_dir / "eval"),
        "epochs": 1,
        "val_interval": 1,
        "batch_size": 2,
        "crops_per_image": 1,
        "patch_size": [16, 16],
        "num_inference_steps": 2,
        "num_samples": 2,
    }


def test_two_training_iterations_then_evaluate(tmp_path, tiny_dataset):
    args = train_args(tiny_dataset, tmp_path)
    engine = run_bundle(BUNDLE, ("train.json",), **args)
    del engine
    ckpt = tmp_path / "model.pt"
    state = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("denoiser.") for k in state)
    before = {k: v.clone() for k, v in state.items()}
    for n in (1, 2):
        run_bundle(BUNDLE, ("train.json", "evaluate.json"), **{**args, "num_samples": n})
        report = json.loads((tmp_path / "eval" / f"N{n}" / "calibration.json").read_text())
        assert report["num_samples"] == n and report["images"] == 1
        assert 0 <= report["metrics"]["val_mean_dice"] <= 1 and 0 <= report["metrics"]["ece"] <= 1
        assert len(report["reliability"]["pixels"]) == 10 and sum(report["reliability"]["pixels"]) == 32 * 32
        assert (tmp_path / "eval" / f"N{n}" / "metrics.csv").exists()
    after = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)  # evaluation does not train


def test_training_stops_resumes_and_ships_ema_weights(tmp_path, tiny_dataset):
    args = {**train_args(tiny_dataset, tmp_path), "ema_decay": 0.5}
    check_resumable_training(BUNDLE, ["train.json"], "epochs", **args)


def test_stopped_and_resumed_bundle_training_equals_one_run(tmp_path, tiny_dataset):
    """train.json itself: 2 epochs in one run and 1 + resume + 1 (the same LR schedule) ship the same EMA weights:
    random crops, flips, intensity augmentation, shuffling and diffusion noise all continue where they stopped."""
    shipped = []
    for name, runs in (("whole", (2,)), ("parts", (1, 2))):
        args = {**train_args(tiny_dataset, tmp_path / name), "ema_decay": 0.5, "lr_total_steps": 4}
        for epochs in runs:
            run_bundle(BUNDLE, ("train.json",), **{**args, "epochs": epochs, "resume": epochs > 1})
        shipped.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    whole, parts = shipped
    assert whole.keys() == parts.keys()
    assert max((whole[k] - parts[k]).abs().max().item() for k in whole) < 1e-6


def test_training_counts_two_iterations_and_changes_weights(tmp_path, tiny_dataset):
    parser = load_config(BUNDLE, ("train.json",), **train_args(tiny_dataset, tmp_path))
    with bundle_imports(BUNDLE):
        trainer = parser.get_parsed_content("train#trainer")
        start = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        trainer.run()
    assert trainer.state.iteration == 2
    assert any(not torch.equal(start[k], v) for k, v in trainer.network.state_dict().items())


def test_feedforward_twin_trains_the_same_network_on_noise_then_evaluates(tmp_path, tiny_dataset):
    args = {
        k: v for k, v in train_args(tiny_dataset, tmp_path).items() if k not in ("num_inference_steps", "num_samples")
    }
    parser = load_config(BUNDLE, FEEDFORWARD, **args)
    with bundle_imports(BUNDLE):
        loss = parser.get_parsed_content("loss")
        diffusion = load_config(BUNDLE, ("train.json",), **args).get_parsed_content("denoiser_def")
        ff = parser.get_parsed_content("denoiser_def")
        seg = parser.get_parsed_content("network_def")
    assert type(ff) is type(diffusion)
    # the diffusion network plus nothing but G(I)'s GroupNorm (condition_norm; the twin's x_t is pure noise)
    normed = {n.replace("image_encoder.0.", "image_encoder."): p.shape for n, p in diffusion.named_parameters()}
    assert [p.shape for p in ff.parameters()] == [v for n, v in normed.items() if not n.startswith("image_encoder.1.")]
    assert loss.dice_weight == 1 and loss.ce_weight == 1 and loss.mse_weight == 0 and loss.logits_output
    assert seg.num_inference_steps == 1 and seg.num_samples == 1 and seg.scheduler.prediction_type == "sample"
    image, mask = blobs((16, 16))
    batch = {"image": torch.tensor(image, dtype=torch.float32)[None, None], "label": torch.tensor(mask)[None, None]}
    x, *_ = check_feedforward_input(BUNDLE, batch, **args)
    torch.manual_seed(0)
    assert torch.equal(x, torch.randn_like(x))  # pure N(0, I) noise
    train_and_evaluate_twin(BUNDLE, tmp_path / "eval" / "N1" / "metrics.csv", **args)
    ckpt = tmp_path / "model_feedforward.pt"
    image_dir = tmp_path / "in"
    image_dir.mkdir()
    (image_dir / "x.png").write_bytes((tiny_dataset / "image" / "4.png").read_bytes())
    infer(image_dir, tmp_path / "out", ckpt, configs=("inference.json", "inference_feedforward.json"))
    assert (tmp_path / "out" / "x_seg.nii.gz").exists()
    parser = load_config(BUNDLE, ("inference.json", "inference_feedforward.json"), **TINY)
    with bundle_imports(BUNDLE):
        seg = parser.get_parsed_content("network_def")
    assert seg.num_inference_steps == 1 and seg.num_samples == 1 and seg.logits_output


# ---- SegDiff facts --------------------------------------------------------------------------------------------------
def test_schedule_values():
    with bundle_imports(BUNDLE):
        sched = load_config(BUNDLE).get_parsed_content("scheduler")
    assert sched.num_train_timesteps == 100 and sched.prediction_type == "epsilon"
    assert sched.variance_type == "fixed_large"
    assert float(sched.betas64[0]) == pytest.approx(0.001, abs=1e-12)
    assert float(sched.betas64[99]) == pytest.approx(0.2, abs=1e-12)
    assert float(sched.alphas_cumprod64[99]) == pytest.approx(2.039e-5, rel=1e-3)
    assert float(sched.betas64[1] - sched.betas64[0]) == pytest.approx(0.199 / 99)


def test_rrdb_encoder_structure():
    net = tiny_denoiser(rrdb_blocks=2, rrdb_features=8, rrdb_growth=4)
    g = net.image_encoder
    assert len(g.trunk) == 2 and all(len(rrdb.blocks) == 3 for rrdb in g.trunk)
    dense = g.trunk[0].blocks[0]
    assert [c.out_channels for c in dense.convs] == [4, 4, 4, 4, 8] and dense.scale == 0.2
    assert [c.in_channels for c in dense.convs] == [8, 12, 16, 20, 24]
    assert g.conv_first.out_channels == 8 and g.conv_last.out_channels == net.unet.block_out_channels[0]
    assert net.mask_encoder.conv.kernel_size == (3, 3) and net.mask_encoder.conv.in_channels == 1
    assert tuple(net.encode_condition(torch.rand(2, 1, 16, 24)).shape) == (2, 8, 16, 24)


def test_x_t_enters_only_through_f():
    net = randomize(tiny_denoiser()).eval()
    image, t = torch.rand(2, 1, 16, 16), torch.tensor([3, 70])
    x1, x2 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net(x1, t, image), net(x2, t, image))
        net.mask_encoder.conv.weight.zero_()
        net.mask_encoder.conv.bias.zero_()
        torch.testing.assert_close(net(x1, t, image), net(x2, t, image), rtol=0, atol=0)
        assert not torch.allclose(net(x1, t, image), net(x1, t, image + 1))  # still depends on I


def test_condition_norm_keeps_g_at_unit_scale_so_x_t_stays_visible():
    """G has no normalisation: scaled-up weights scale G(I) (the 0.3.x weights had G(I) rms 1.3e5 vs F(x_t) 0.6,
    and their ε̂ no longer depended on x_t). condition_norm GroupNorms G(I), whatever G's scale."""
    image = torch.rand(2, 1, 16, 16)
    plain, normed = tiny_denoiser(), tiny_denoiser(condition_norm=True)
    assert isinstance(normed.image_encoder[1], torch.nn.GroupNorm) and normed.image_encoder[1].num_groups == 4
    normed.image_encoder[0].load_state_dict(plain.image_encoder.state_dict())
    with torch.no_grad():
        plain.image_encoder.conv_last.weight.mul_(1e4)
        normed.image_encoder[0].conv_last.weight.mul_(1e4)
        assert float(plain.encode_condition(image).pow(2).mean().sqrt()) > 100
        g = normed.encode_condition(image)
    assert float(g.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.01)
    assert tuple(g.shape) == (2, 8, 16, 16)


def test_cached_g_gives_the_same_samples_as_recomputing_it():
    net = randomize(tiny_denoiser()).eval()
    calls = []
    original = net.image_encoder.forward
    net.image_encoder.forward = lambda x: calls.append(x.shape[0]) or original(x)
    image = torch.rand(1, 1, 16, 16)
    sched = DDPMSampler(100, "improved_linear_beta")
    cached = DiffusionSegmenter(net, sched, BinaryCodec(1), num_inference_steps=25, num_samples=3, seed=5)
    cached = cached.predict(image)
    assert calls == [1]  # once per image for all 25 steps and 3 samples
    with bundle_imports(BUNDLE):
        from scripts.network import UncachedDenoiser

        recompute = UncachedDenoiser(net)
    plain = DiffusionSegmenter(recompute, sched, BinaryCodec(1), num_inference_steps=25, num_samples=3, seed=5)
    plain = plain.predict(image)
    assert recompute.calls == 25 and calls[1:] == [3] * 25  # G on all 3 samples at every step
    # equal up to float rounding (G on 1 image vs on the 3-sample batch): 100 steps, same noise
    torch.testing.assert_close(cached.samples, plain.samples, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached.probs, plain.probs, rtol=0, atol=1e-4)
    assert cached.samples.std(dim=1).max() > 1e-2  # the samples differ from each other: a real test


class FixedX0(ConditionalDenoiser):
    """Predicts x0 = the values in ``table`` (one per ensemble member) everywhere (prediction_type='sample')."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def denoise(self, x_t, timesteps, features):
        return self.table.repeat(x_t.shape[0] // len(self.table))[:, None, None, None].expand_as(x_t).clone()


def test_ensemble_mean_then_threshold_half():
    # per-member x0 → clamp((x+1)/2, 0, 1): 1.4→1, 0→0.5, -0.2→0.4, -3→0; mean = 0.475 → background
    table = [1.4, 0.0, -0.2, -3.0]
    seg = DiffusionSegmenter(
        FixedX0(table),
        DDPMSampler(100, "improved_linear_beta", prediction_type="sample"),
        BinaryCodec(1),
        num_inference_steps=3,
        num_samples=4,
        seed=0,
    )
    out = seg.predict(torch.zeros(1, 1, 8, 8))
    assert out.samples[0, :, 1, 0, 0].tolist() == pytest.approx([1.0, 0.5, 0.4, 0.0])
    assert out.probs[0, 1, 0, 0].item() == pytest.approx(0.475)
    assert out.probs[0, 0, 0, 0].item() == pytest.approx(0.525)
    std = seg(torch.zeros(1, 1, 8, 8)) is not None and seg.last_uncertainty.std
    assert std[0, 1, 0, 0].item() == pytest.approx(float(np.std([1.0, 0.5, 0.4, 0.0])), rel=1e-5)
    # the bundle's post-processing labels p > 0.5 as foreground; exactly 0.5 stays background (torch.round)
    with bundle_imports(BUNDLE):
        post = load_config(BUNDLE, save_uncertainty=False).get_parsed_content("postprocessing")
    p = torch.tensor([0.2, 0.475, 0.5, 0.5001, 0.9]).reshape(1, 1, 5)
    out = post.transforms[0]({"pred": torch.cat([1 - p, p])})["pred"]
    assert out.reshape(-1).tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("overlap", [0.5, 0.0])  # inference.json's default (Gaussian blending of ε), the paper's tiling
def test_tiles_have_no_seams_for_a_per_pixel_network(pointwise_denoiser, overlap):
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, roi_size=[8, 8])
        assert parser["overlap"] == 0.5 and parser["blend_mode"] == "gaussian"
        parser["overlap"] = overlap
        inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, WindowConsistentInferer) and inferer.window_args["overlap"] == overlap
    den = pointwise_denoiser(channels=1, out_channels=1, timesteps=100)
    sched = DDPMSampler(100, "improved_linear_beta")
    seg = DiffusionSegmenter(den, sched, BinaryCodec(1), num_inference_steps=10, num_samples=3, seed=2)
    image = torch.rand(1, 1, 20, 28)  # 3×4 tiles, the last ones overlapping the border
    whole = seg(image)
    tiled = inferer(image, seg)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)


# ---- demo weights ---------------------------------------------------------------------------------------------------
OTSU_QUARTER = 0.846  # held-out quarter, skimage's Otsu threshold of the whole image (of the quarter itself: 0.855)


@pytest.mark.slow
@pytest.mark.data
def test_shipped_weights_beat_otsu_on_the_held_out_quarter(tmp_path):
    """inference.json defaults (N = 9, 100 steps, 64² windows) on columns 384–511, never trained on: Dice ≥ 0.86."""
    assert _heldout_quarter_dice(tmp_path, ("inference.json",)) >= 0.86 > OTSU_QUARTER


@pytest.mark.slow
@pytest.mark.data
def test_shipped_feedforward_twin_segments_the_held_out_quarter(tmp_path):
    """The twin (models/model_feedforward.pt, one call through inference_feedforward.json) on the quarter: the card's
    0.949 (floor 0.94), far above Otsu."""
    assert _heldout_quarter_dice(tmp_path, ("inference.json", "inference_feedforward.json")) >= 0.94


@pytest.mark.slow
@pytest.mark.data
def test_shipped_denoiser_reads_x_t_on_the_held_out_quarter():
    """Guard against the 0.3.x collapse (ε̂ independent of x_t, noise slope 0.00): the implied ε̂ of the shipped
    weights follows the drawn noise (paper-001 fingerprint's noise_slope ≥ 0.5 from t = 33 on) on 64² crops of the
    held-out quarter, and its one-call x̂0 at t = 55 beats the 0.3.x weights' 0.80."""
    from diffseg.analysis import mask_error_curve
    from diffseg.data import data_path

    image = tifffile.imread(data_path("stardist/img2d.tif"))[:, 384:448].astype(np.float32)
    mask = tifffile.imread(data_path("stardist/mask2d.tif"))[:, 384:448] > 0
    parser = load_config(BUNDLE)
    with bundle_imports(BUNDLE):
        segmenter = parser.get_parsed_content("network_def").eval()
        segmenter.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True))
    mean, std = parser.get_parsed_content("image_mean")[0], parser.get_parsed_content("image_std")[0]
    pairs = [
        (torch.from_numpy((image[r : r + 64] - mean) / std)[None, None], torch.from_numpy(mask[r : r + 64])[None, None])
        for r in range(0, 512, 128)
    ]
    with torch.no_grad():
        rows = {r["t"]: r for r in mask_error_curve(segmenter, pairs, [33, 55, 77, 99], draws=2)}
    assert all(r["noise_slope"] >= 0.5 for r in rows.values()), rows
    assert rows[55]["dice"] > 0.80, rows


def _heldout_quarter_dice(tmp_path: Path, configs: tuple[str, ...]) -> float:
    """Dice of the bundle run with ``configs`` on the held-out quarter (columns 384–511) of the stardist image."""
    from diffseg.data import data_path

    image = tifffile.imread(data_path("stardist/img2d.tif"))
    mask = tifffile.imread(data_path("stardist/mask2d.tif"))[:, 384:] > 0
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(image[:, 384:].astype(np.uint8)).save(folder / "heldout.png")
    run_bundle(BUNDLE, configs, dataset_dir=str(folder), output_dir=str(tmp_path / "out"))
    seg, _ = read_nifti(tmp_path / "out" / "heldout_seg.nii.gz")
    assert seg.shape == (128, 512)  # PNG readers store (x, y)
    return dice(seg.T, mask)


@pytest.mark.slow
@pytest.mark.data
def test_make_demo_config_segments_the_held_out_quarter(tmp_path):
    """demo.json (what ``make demo`` runs: the whole image, fewer respaced steps): Dice ≥ 0.84 on the quarter."""
    from diffseg.data import data_path

    mask = tifffile.imread(data_path("stardist/mask2d.tif")) > 0
    run_bundle(BUNDLE, ("inference.json", "demo.json"), output_dir=str(tmp_path / "out"), save_overlay=False)
    (path,) = (tmp_path / "out").glob("*_seg.nii.gz")
    seg, _ = read_nifti(path)
    assert seg.shape == (512, 512)
    assert dice(seg.T[:, 384:], mask[:, 384:]) >= 0.84


@pytest.mark.slow
def test_two_process_training_with_torchrun_on_cpu(tmp_path, tiny_dataset):
    """multi_gpu_train.json: DDP with the gloo backend on CPU, 2 processes, rank 0 saves the checkpoint."""
    run_torchrun(BUNDLE, tmp_path, **{**train_args(tiny_dataset, tmp_path), "val_interval": 0})
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state and all(k.startswith("denoiser.") for k in state)  # the plain segmenter's keys, no "module."


# --- a real training process killed with kill -9, then stopped by SIGTERM, then resumed to the end ------------------


def _start_training(overrides: dict, log: Path) -> subprocess.Popen:
    """``python -m monai.bundle run`` of train.json in a new process, its output in ``log``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "train.json")]
    cmd += ["--bundle_root", str(ROOT), "--meta_file", str(ROOT / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(ROOT / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value)]  # fire reads Python literals
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "common"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _checkpoint_iteration(path: Path) -> int:
    return torch.load(path, weights_only=True)["trainer"]["iteration"]


def _wait(proc: subprocess.Popen, log: Path, done, what: str, timeout: float = 240) -> None:
    """Poll until ``done()``; fail with the run's output when the process ends first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        if done():
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{what} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_periodic_checkpoint_and_sigterm_saves(tmp_path, tiny_dataset):
    args = {**train_args(tiny_dataset, tmp_path), "val_interval": 0, "ema_decay": 0.9, "curve_log_interval": 1}
    args.update(epochs=100000, ckpt_minutes=0.2 / 60, num_samples=1)
    ckpt, log = tmp_path / "model.checkpoint.pt", tmp_path / "run.log"
    proc = _start_training(args, log)
    _wait(proc, log, lambda: ckpt.exists() and _checkpoint_iteration(ckpt) > 2, "no periodic checkpoint past 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _checkpoint_iteration(ckpt)  # the last periodic checkpoint before the kill
    assert (tmp_path / "model.pt").exists()

    # the resumed run saves only when it ends: SIGTERM must stop it cleanly and write that final checkpoint
    proc = _start_training({**args, "resume": True, "ckpt_minutes": None}, log)
    resumed = f"resume: continuing from iteration {killed_at}"
    _wait(proc, log, lambda: resumed in log.read_text(), f"no {resumed!r}")
    _wait(proc, log, lambda: log.read_text().count("train_loss") >= 3, "no training iterations after resuming")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "SIGTERM: stopping after iteration" in log.read_text()
    stopped_at = _checkpoint_iteration(ckpt)
    assert stopped_at > killed_at

    per_epoch = 2  # 4 training images, batch 2
    epochs = stopped_at // per_epoch + 2
    run_bundle(BUNDLE, ("train.json",), **{**args, "epochs": epochs, "resume": True})
    assert _checkpoint_iteration(ckpt) == epochs * per_epoch
    iterations = [int(r["iteration"]) for r in read_curve(tmp_path / "eval" / "curve.csv") if "loss" in r]
    assert iterations == sorted(set(iterations)) and iterations[-1] == epochs * per_epoch
    assert set(range(1, killed_at + 1)) <= set(iterations)  # rows up to the resumed checkpoint are kept
    shipped = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(k.startswith("denoiser.") for k in shipped)  # the plain state_dict of network_def
