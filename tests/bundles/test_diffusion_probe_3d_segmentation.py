"""diffusion_probe_3d_segmentation: the bundle contract, the cosine schedule, frozen multi-timestep features, the
probing head, anatomical coordinates and window-averaged features."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bundle_testing import (
    BUNDLES,
    FEEDFORWARD,
    FIVE_ORGANS,
    bad_volume_cases,
    bad_volume_folder,
    bundle_imports,
    check_metadata,
    check_net_in_out,
    check_resumable_training,
    error_text,
    infer_images,
    load_config,
    patient_b_dice,
    read_nifti,
    run_bundle,
    run_torchrun,
    save_weights,
    write_nifti,
)
from monai.data import MetaTensor

BUNDLE = "diffusion_probe_3d_segmentation"
TINY = {
    "backbone_channels": [8, 8, 8, 8],
    "head_dim": 8,
    "num_heads": 1,
    "roi_size": [32, 32, 16],
    "pixdim": [3.0, 3.0, 3.0],
}
CLASSES = 13
SPACING = np.diag([3.0, 3.0, 3.0, 1.0])


def parsed(item: str, configs=("inference.json",), **override):
    with bundle_imports(BUNDLE):
        return load_config(BUNDLE, list(configs), **{**TINY, **override}).get_parsed_content(item)


def tiny_weights(tmp_path, **override) -> str:
    """A random tiny segmenter's plain state_dict (what the shipped model.pt is, at demo size)."""
    net = parsed("network_def", **override)
    return save_weights(net, tmp_path / "tiny.pt")


def ct(shape, seed=0) -> np.ndarray:
    """Air around a 'body' of random soft tissue: the body box is the inner region."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000.0, np.float32)
    inner = tuple(slice(2, s - 2) for s in shape)
    array[inner] = rng.uniform(-200, 300, array[inner].shape)
    return array


def infer(tmp_path, images, **override):
    ckpt = override.pop("ckpt_path", None) or tiny_weights(tmp_path)
    return infer_images(BUNDLE, tmp_path, images, **{**TINY, "ckpt_path": ckpt, **override})


# ---- contract --------------------------------------------------------------------------------------------------------
def test_metadata_and_network_contract():
    check_metadata(BUNDLE)
    check_net_in_out(BUNDLE, **TINY)


def test_shipped_weights_are_a_plain_state_dict_of_backbone_and_head():
    path = BUNDLES / BUNDLE / "models" / "model.pt"
    state = torch.load(path, weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values()) and path.stat().st_size < 20e6
    assert any(k.startswith("extractor.backbone.") for k in state) and any(k.startswith("head.") for k in state)
    with bundle_imports(BUNDLE):
        net = load_config(BUNDLE).get_parsed_content("network_def")
    net.load_state_dict(state)  # strict: the default inference.json is the shipped network
    backbone = torch.load(BUNDLES / BUNDLE / "models" / "backbone.pt", weights_only=True)
    for key, value in backbone.items():  # the probe was trained on the shipped pretrained backbone
        torch.testing.assert_close(state["extractor.backbone." + key], value)
    twin = torch.load(BUNDLES / BUNDLE / "models" / "model_feedforward.pt", weights_only=True)
    with bundle_imports(BUNDLE):
        twin_config = load_config(BUNDLE, ["inference.json", "inference_feedforward.json"])
        twin_net = twin_config.get_parsed_content("network_def")
    twin_net.load_state_dict(twin)  # strict: inference_feedforward.json is the twin's network (t = 0 features)
    key = "extractor.backbone." + next(iter(backbone))
    assert not torch.equal(twin[key], state[key])  # its backbone trained end to end, not the pretrained one


def test_folder_inference_keeps_the_original_geometry(tmp_path):
    lps = np.diag([-3.0, -2.5, 4.0, 1.0])
    lps[:3, 3] = [40.0, 30.0, -20.0]
    images = {"a.nii.gz": (ct((40, 30, 12)), SPACING), "b.nii": (ct((23, 33, 9), 1), lps)}
    out = infer(tmp_path, images)
    for name, (array, affine) in images.items():
        label, label_affine = read_nifti(out / f"{name.split('.')[0]}_seg.nii.gz")
        assert label.shape == array.shape and label.dtype == np.uint8
        np.testing.assert_allclose(label_affine, affine, atol=1e-4)
        assert set(np.unique(label)) <= set(range(CLASSES))


def test_same_seed_gives_an_identical_label_file(tmp_path):
    images = {"a.nii.gz": (ct((40, 40, 20)), SPACING)}
    ckpt = tiny_weights(tmp_path)
    first = infer(tmp_path / "1", images, ckpt_path=ckpt)
    second = infer(tmp_path / "2", images, ckpt_path=ckpt)
    a, b = (np.asarray(nib.load(f / "a_seg.nii.gz").dataobj) for f in (first, second))
    assert np.array_equal(a, b)


def test_seeded_noise_makes_the_segmenter_deterministic_and_the_seed_matters():
    net = parsed("network_def").eval()
    x = torch.rand(1, 3, 32, 32, 16) * 2 - 1  # image + 2 in-plane coordinates
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    other = parsed("network_def", **{"displayable_configs#seed": 1}).eval()
    other.load_state_dict(net.state_dict())
    assert (other(x) - net(x)).abs().max() > 1e-6


@pytest.mark.parametrize(("case", "match"), bad_volume_cases())
def test_bad_inputs_fail_with_a_clear_error_naming_the_file(tmp_path, case, match):
    target = bad_volume_folder(tmp_path, case)
    with pytest.raises(Exception) as info:
        infer(tmp_path, {}, dataset_dir=str(target))
    assert match in error_text(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---- paper facts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("configs", [["pretrain.json"], ["inference.json"], ["train.json"]])
def test_cosine_schedule_noise_std_at_the_probing_timesteps(configs):
    scheduler = parsed("scheduler", configs)
    assert scheduler.num_train_timesteps == 300 and scheduler.prediction_type == "epsilon"
    std = (1 - scheduler.alphas_cumprod64[[10, 30, 60]]).sqrt()
    np.testing.assert_allclose(std.numpy(), [0.068, 0.172, 0.323], atol=6e-4)
    if configs != ["pretrain.json"]:
        assert parsed("times", configs) == [10, 30, 60]


def test_pretraining_uses_monai_diffusion_glue_and_saves_the_backbone(tmp_path):
    write_dataset(tmp_path / "data")
    common = {**TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ckpt"),
              "output_dir": str(tmp_path / "out"), "patch_size": [32, 32, 16], "cache_rate": 0.0}  # fmt: skip
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, ["pretrain.json"], max_epochs=1, **common)
        trainer = parser.get_parsed_content("pretrain#trainer")
        calls = []
        trainer.network.register_forward_hook(
            lambda m, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True
        )
        before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        trainer.run()
        (clip,) = [h for h in parser.get_parsed_content("pretrain#handlers") if type(h).__name__ == "GradientClipping"]
    assert clip.max_norm == 1.0 and clip.last_norm is not None  # the global gradient norm is clipped every update
    assert type(trainer.prepare_batch).__name__ == "DiffusionPrepareBatch"
    assert isinstance(trainer.loss_function, nn.SmoothL1Loss)
    x, context = calls[0][1]["x"], calls[0][1]["context"]
    assert x.shape == (4, 1, 32, 32, 16) and context.shape == (4, 2, 32, 32, 16)  # 4 patches: noisy image + 2 coords
    saved = torch.load(tmp_path / "ckpt" / "backbone.pt", weights_only=True)
    assert saved.keys() == before.keys() and any(not torch.equal(before[k], saved[k]) for k in saved)
    unguided = parsed("backbone", ["pretrain.json", "no_guidance.json"])
    assert unguided.in_channels == 1


# ---- features and head -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("times", [[10], [10, 30, 60]])
def test_pyramid_channels_times_len_times_reach_the_head(times):
    net = parsed("network_def", times=times).eval()
    seen = []
    net.head.register_forward_pre_hook(lambda m, args: seen.append([tuple(f.shape) for f in args[0]]))
    out = net(torch.rand(1, 3, 32, 32, 16))
    assert out.shape == (1, CLASSES, 32, 32, 16)
    levels = net.backbone.pyramid_channels  # coarse to fine
    assert levels == TINY["backbone_channels"][::-1]
    sizes = [(4, 4, 2), (8, 8, 4), (16, 16, 8), (32, 32, 16)]
    assert seen == [[(1, c * len(times), *s) for c, s in zip(levels, sizes, strict=True)]]


def test_linear_head_is_linear_in_the_features():
    net = parsed("network_def", head="linear")
    pyramid = [
        torch.randn(1, c, *s)
        for c, s in zip(net.extractor.channels, [(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)], strict=False)
    ]
    bias = net.head([torch.zeros_like(f) for f in pyramid])
    torch.testing.assert_close(net.head([2 * f for f in pyramid]) - bias, 2 * (net.head(pyramid) - bias))


def write_dataset(root, n=2):
    """n tiny labelled CTs (a bright box = class 5 'liver', a dark box = class 1 'spleen') and an MSD dataset.json."""
    entries = []
    for i in range(n):
        image, label = ct((40, 40, 20), i), np.zeros((40, 40, 20), np.uint8)
        image[8:20, 8:20, 4:12], label[8:20, 8:20, 4:12] = 300, 5
        image[24:34, 20:30, 8:16], label[24:34, 20:30, 8:16] = -100, 1
        write_nifti(root / f"img{i}.nii.gz", image, SPACING)
        write_nifti(root / f"lab{i}.nii.gz", label, SPACING)
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    dataset = {"training": entries, "validation": entries[:1], "pretraining": [{"image": e["image"]} for e in entries]}
    (root / "dataset.json").write_text(json.dumps(dataset))


def train_common(tmp_path, backbone: str) -> dict:
    return {**TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "eval"), "patch_size": [32, 32, 16], "cache_rate": 0.0,
            "backbone_ckpt": backbone}  # fmt: skip


@pytest.mark.parametrize("feature_cache", [False, True])
def test_head_training_leaves_the_backbone_frozen(tmp_path, feature_cache):
    write_dataset(tmp_path / "data", n=1)
    backbone = tmp_path / "backbone.pt"
    torch.save(parsed("backbone").state_dict(), backbone)
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, ["train.json"], max_epochs=2, val_interval=0, feature_cache=feature_cache,
                             **train_common(tmp_path, str(backbone)))  # fmt: skip
        trainer = parser.get_parsed_content("train#trainer")
        segmenter = parser.get_parsed_content("network")
        modes = []
        pyramid = segmenter.backbone.pyramid  # the extractor calls pyramid(), not forward(): spy on it

        def spy(*args, **kwargs):
            modes.append((segmenter.backbone.training, torch.is_grad_enabled()))
            return pyramid(*args, **kwargs)

        segmenter.backbone.pyramid = spy
        before = {k: v.clone() for k, v in segmenter.state_dict().items()}
        trainer.run()
    assert modes and all(mode == (False, False) for mode in modes)  # eval mode, no graph through the backbone
    assert all(p.grad is None for p in segmenter.backbone.parameters())
    after = segmenter.state_dict()
    loaded = torch.load(backbone, weights_only=True)
    for key, value in loaded.items():  # the pretrained weights were loaded and stayed unchanged
        torch.testing.assert_close(after["extractor.backbone." + key], value, rtol=0, atol=0)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("head."))


def test_feedforward_twin_trains_backbone_and_head_end_to_end_from_random_weights(tmp_path):
    write_dataset(tmp_path / "data", n=1)
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, FEEDFORWARD, max_epochs=2, val_interval=0,
                             **train_common(tmp_path, "/nowhere/backbone.pt"))  # fmt: skip
        trainer = parser.get_parsed_content("train#trainer")
        segmenter = parser.get_parsed_content("network")
        handlers = parser.get_parsed_content("train#handlers")
        clipping = next(h for h in handlers if type(h).__name__ == "GradientClipping")
        modes = []
        pyramid = segmenter.backbone.pyramid

        def spy(*args, **kwargs):
            modes.append((segmenter.backbone.training, torch.is_grad_enabled(), int(args[1][0])))
            return pyramid(*args, **kwargs)

        segmenter.backbone.pyramid = spy
        before = {k: v.clone() for k, v in segmenter.state_dict().items()}
        trainer.run()
    assert modes and all(mode == (True, True, 0) for mode in modes)  # trained, with a graph, at t = 0 only
    assert clipping.max_norm == 1.0 and clipping.last_norm is not None
    after = torch.load(tmp_path / "ckpt" / "model_feedforward.pt", weights_only=True)
    for part in ("extractor.backbone.", "head."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    assert parsed("times", ["inference.json", "inference_feedforward.json"]) == [0]
    assert parsed("ckpt_path", ["inference.json", "inference_feedforward.json"]).endswith("models/model_feedforward.pt")


def test_pretraining_and_head_training_stop_and_resume(tmp_path):
    write_dataset(tmp_path / "data", n=1)
    backbone = tmp_path / "ckpt" / "backbone.pt"
    common = train_common(tmp_path, str(backbone))
    check_resumable_training(BUNDLE, ["pretrain.json"], weights="backbone.pt", ema_decay=0.5, **common)
    check_resumable_training(BUNDLE, ["train.json"], val_interval=0, ema_decay=0.5, **common)


def test_random_backbone_control_skips_the_pretrained_weights(tmp_path):
    write_dataset(tmp_path / "data", n=1)
    data = {"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "eval")}  # handlers write logs there
    configs = ["train.json", "random_backbone.json"]
    handlers = parsed("train#handlers", configs, backbone_ckpt="/nowhere/backbone.pt", **data)
    assert not any(type(h).__name__ == "CheckpointLoader" for h in handlers)
    assert any(type(h).__name__ == "CheckpointLoader" for h in parsed("train#handlers", ["train.json"], **data))
    assert parsed("times", ["train.json", "times_100.json"]) == [100]


def test_two_training_iterations_then_evaluate(tmp_path):
    write_dataset(tmp_path / "data")
    backbone = tmp_path / "backbone.pt"
    torch.save(parsed("backbone").state_dict(), backbone)
    common = train_common(tmp_path, str(backbone))
    run_bundle(BUNDLE, ["train.json"], max_epochs=1, val_interval=1, **common)  # 2 volumes = 2 iterations
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values()) and any(k.startswith("head.") for k in state)
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], ckpt_path=str(tmp_path / "ckpt" / "model.pt"), **common)
    metrics = (tmp_path / "eval" / "metrics.csv").read_text()
    for name in ("val_mean_dice", "val_hd95", "val_ece"):
        assert name in metrics
    per_class = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert per_class[0].startswith("filename,class0") and len(per_class[0].split(",")) == CLASSES + 1


# ---- coordinates -----------------------------------------------------------------------------------------------------
def coordinates(array: np.ndarray, affine: np.ndarray, **kwargs) -> torch.Tensor:
    with bundle_imports(BUNDLE):
        from scripts.coordinates import BodyCoordinatesd

        image = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine))
        return BodyCoordinatesd("image", **kwargs)({"image": image})["coords"]


def test_coordinates_follow_the_affine_when_the_orientation_flips():
    array = ct((20, 16, 12))
    array[3:9, 4:12, 2:10] = 500  # an asymmetric structure
    coords = coordinates(array, SPACING)
    assert coords.shape == (3, 20, 16, 12)
    assert float(coords[0, 2].mean()) == pytest.approx(-1.0) and float(coords[0, -3].mean()) == pytest.approx(1.0)
    # the same anatomy stored flipped along the first axis (x decreasing): the coordinates flip with it
    flipped = SPACING.copy()
    flipped[0, 0], flipped[0, 3] = -3.0, 3.0 * 19
    torch.testing.assert_close(coordinates(array[::-1].copy(), flipped), coords.flip(1))
    # the same array with a flipped affine is a mirrored patient: its x coordinates run the other way
    torch.testing.assert_close(coordinates(array, flipped)[0], -coords[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(coordinates(array, flipped)[1:], coords[1:])


def test_in_plane_coordinates_keep_the_chosen_scanner_axes_and_the_configs_size_the_backbone_input():
    array = ct((20, 16, 12))
    coords = coordinates(array, SPACING)
    torch.testing.assert_close(coordinates(array, SPACING, axes=(0, 1)), coords[:2])
    torch.testing.assert_close(coordinates(array, SPACING, axes=(2, 0)), coords[[2, 0]])
    for axes in [(), (0, 0), (1, 3)]:
        with pytest.raises(ValueError, match="distinct scanner axes among 0, 1, 2"):
            coordinates(array, SPACING, axes=axes)
    for configs in [("inference.json",), ("pretrain.json",), ("train.json",)]:
        assert parsed("backbone", configs).in_channels == 3  # image + 2 in-plane coordinates (the default)
        assert parsed("backbone", configs, coordinate_axes=[0, 1, 2]).in_channels == 4


def test_the_body_box_of_the_largest_component_leaves_the_table_out():
    array = ct((20, 16, 12))  # body at y = 2..13, air at y = 14, 15
    with_table = array.copy()
    with_table[:, 15, :] = 0.0  # a table under the whole image, not touching the body
    body = coordinates(with_table, SPACING, largest_component=True)
    torch.testing.assert_close(body, coordinates(array, SPACING))  # as if there were no table
    stretched = coordinates(with_table, SPACING)
    assert float(body[1, 5, 13, 5]) == pytest.approx(1.0)  # the body's last row
    assert float(stretched[1, 5, 13, 5]) == pytest.approx((13 - 2) / (15 - 2) * 2 - 1)  # the table widened the box


def test_external_coordinate_maps_are_loaded_per_image_and_resampled(tmp_path):
    image_path = write_nifti(tmp_path / "img" / "case.nii.gz", ct((10, 8, 6)), SPACING)
    regressor = np.stack(np.meshgrid(*(np.linspace(0, 1, s) for s in (5, 4, 3)), indexing="ij"), -1)  # (5, 4, 3, 3)
    write_nifti(tmp_path / "maps" / "case.nii.gz", regressor.astype(np.float32), np.diag([6.0, 6.0, 6.0, 1.0]))
    with bundle_imports(BUNDLE):
        from monai.transforms import EnsureChannelFirstd, LoadImaged
        from scripts.coordinates import BodyCoordinatesd

        data = EnsureChannelFirstd("image")(LoadImaged("image")({"image": str(image_path)}))
        out = BodyCoordinatesd("image", source="file", coords_dir=tmp_path / "maps", concat=True)(data)
        assert out["image"].shape == (4, 10, 8, 6)
        assert float(out["image"][1, 0, 0, 0]) == pytest.approx(0.0) and float(out["image"][1, 8, 0, 0]) > 0.9
        with pytest.raises(FileNotFoundError, match="case.nii.gz"):
            BodyCoordinatesd("image", source="file", coords_dir=tmp_path / "nowhere")(data)
        with pytest.raises(ValueError, match="coords_dir"):
            BodyCoordinatesd("image", source="file")


# ---- window-averaged features ----------------------------------------------------------------------------------------
def per_voxel_backbone(in_channels: int, channels=(6, 5, 4, 3)) -> nn.Module:
    """A pyramid whose finest level at voxel v depends only on the input at v (and t); coarser levels are block
    averages of it, so features of divisor-aligned windows equal those of the whole volume."""
    with bundle_imports(BUNDLE):
        from scripts.backbone import PyramidBackbone

    class PerVoxelBackbone(PyramidBackbone):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.channels = list(channels)
            self.pointwise = nn.ModuleList(nn.Conv3d(in_channels, c, 1) for c in channels)
            self.time = nn.Embedding(300, 1)

        def pyramid(self, x, timesteps, context=None):
            x = torch.cat([x, context], 1) if context is not None else x
            t = self.time(timesteps)[:, :, None, None, None]
            maps = [torch.tanh(conv(x) + t) for conv in self.pointwise]
            return [F.avg_pool3d(maps[i], 2**i) if i else maps[i] for i in reversed(range(len(maps)))]

    return PerVoxelBackbone()


def test_window_averaged_features_equal_whole_volume_features():
    """A volume larger than the window (3×3×2 windows of 16³ at overlap 0.5): same features, uniform averaging."""
    net = parsed("network_def", roi_size=[16, 16, 16], **{"displayable_configs#sw_overlap": 0.5}).eval()
    net.extractor.backbone = per_voxel_backbone(4)
    x = torch.rand(1, 4, 32, 32, 24) * 2 - 1
    noise = net.draw_noise(x)
    windowed = net.features(x, noise)
    whole = net.extractor(x, noise)
    assert [f.shape[1] for f in whole] == [3 * c for c in (3, 4, 5, 6)]  # channels × len(times), coarse to fine
    for w, h in zip(windowed, whole, strict=True):
        torch.testing.assert_close(w, h, atol=1e-5, rtol=1e-5)
    net.overlap = 0.25  # steps of 12 voxels would cut coarse levels between voxels: rounded down to 8
    for w, h in zip(net.features(x, noise), whole, strict=True):
        torch.testing.assert_close(w, h, atol=1e-5, rtol=1e-5)
    net.roi_size = [12, 16, 16]
    with pytest.raises(ValueError, match="multiple of the backbone's size divisor 8"):
        net.features(x, noise)


def test_field_of_view_shift_is_zero_for_local_features_and_not_for_the_groupnorm_backbone():
    """scripts/field_of_view.py: the features of the same voxels with and without a frame of air around them."""
    with bundle_imports(BUNDLE):
        from scripts.field_of_view import feature_shift
    net = parsed("network_def").eval()
    net.roi_size = [32, 32, 16]  # one pass over the framed volume
    x = torch.rand(1, 3, 16, 16, 16) * 2 - 1
    shifts = feature_shift(net, x, [8, 8], air=-0.7)
    assert len(shifts) == 4 and min(shifts) > 0.01  # GroupNorm and the deep levels see the frame
    net.extractor.backbone = per_voxel_backbone(3)  # features of a voxel from that voxel only
    assert feature_shift(net, x, [8, 8], air=-0.7) == pytest.approx([0.0] * 4, abs=1e-6)


def test_reading_in_slabs_changes_nothing_for_local_features_and_does_for_the_groupnorm_backbone():
    """scripts/field_of_view.py read_in_slabs: a thin series' reading of a thick volume, slab by slab."""
    with bundle_imports(BUNDLE):
        from scripts.field_of_view import read_in_slabs
    net = parsed("network_def", roi_size=[16, 16, 24]).eval()
    net.draw_noise = lambda x, fresh=False: torch.zeros(x.shape[0], 3, *x.shape[2:])  # no noise: features of x only
    x = torch.rand(1, 3, 16, 16, 24) * 2 - 1
    with torch.no_grad():
        whole, slabs = net(x), read_in_slabs(net, x, 8)
        assert slabs.shape == whole.shape == (1, CLASSES, 16, 16, 24)
        assert not torch.allclose(slabs, whole, atol=1e-3)  # GroupNorm and the deep levels see only their slab
        torch.testing.assert_close(read_in_slabs(net, x, 24), whole)
        net.extractor.backbone = per_voxel_backbone(3, channels=(8, 8, 8, 8))  # coarse levels: aligned block means
        torch.testing.assert_close(read_in_slabs(net, x, 8), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draws", [8, 1])
def test_feature_cache_keeps_k_noise_draws_per_volume_and_batches_sample_among_them(draws):
    with bundle_imports(BUNDLE):
        from scripts.probe import CachedFeaturePrepareBatch
    net = parsed("network_def").eval()  # after a validation: the cache must still draw fresh (not seeded) noise
    net.extractor.backbone = per_voxel_backbone(4)
    prepare = CachedFeaturePrepareBatch(net, patch_size=[8, 8, 8], draws=draws)
    image = MetaTensor(torch.rand(1, 4, 16, 16, 16) * 2 - 1, meta={"filename_or_obj": ["a.nii.gz"]})
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[..., 4:12, 4:12, 4:12] = 5
    torch.manual_seed(0)
    used = []
    for _ in range(24):
        crops, labels = prepare({"image": image, "label": label})
        used.append(prepare.last_draw)
    assert [c.shape[2:] for c in crops] == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)] and labels.shape[0] == 1
    (cached_draws,) = prepare.cache.values()
    pyramids = [pyramid for pyramid, _, _ in cached_draws]
    assert len(pyramids) == draws
    torch.manual_seed(0)  # draw k is the k-th noise draw of the seeded global generator: a seeded run is reproducible
    for pyramid in pyramids:
        for cached, expected in zip(pyramid, net.features(image, net.draw_noise(image, fresh=True)), strict=True):
            torch.testing.assert_close(cached, expected)
    finest = [p[-1] for p in pyramids]
    assert all(not torch.equal(a, b) for i, a in enumerate(finest) for b in finest[i + 1 :])  # K distinct draws
    assert len(set(used)) >= (4 if draws > 1 else 1) and set(used) <= set(range(draws))
    with pytest.raises(ValueError, match="draws=0"):
        CachedFeaturePrepareBatch(net, patch_size=[8, 8, 8], draws=0)


def test_feature_cache_draws_see_the_augmented_image_and_the_untouched_coordinates():
    with bundle_imports(BUNDLE):
        from scripts.probe import CachedFeaturePrepareBatch
    net = parsed("network_def").eval()
    net.extractor.backbone = per_voxel_backbone(4)
    calls = []

    def brighter(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x + 0.5

    prepare = CachedFeaturePrepareBatch(net, patch_size=[8, 8, 8], draws=3, augment=brighter)
    image = torch.rand(1, 4, 16, 16, 16) * 2 - 1
    augmented = prepare.augmented(image)
    torch.testing.assert_close(augmented[:, :1], image[:, :1] + 0.5)
    torch.testing.assert_close(augmented[:, 1:], image[:, 1:])  # coordinates are not intensities
    calls.clear()
    torch.manual_seed(0)
    pyramids, _ = prepare.volume(image, torch.zeros(1, 1, 16, 16, 16, dtype=torch.long))
    assert calls == [(1, 16, 16, 16)] * 3  # once per draw, on the image channel only
    torch.manual_seed(0)
    for pyramid in pyramids:
        for cached, expected in zip(pyramid, net.features(augmented, net.draw_noise(image, fresh=True)), strict=True):
            torch.testing.assert_close(cached, expected)
    # train.json's draw augmentation (intensity_prob): off by default, scale / shift / contrast when on
    x = torch.rand(1, 16, 16, 16) * 2 - 1
    torch.testing.assert_close(parsed("train#draw_augment", ["train.json"])(x.clone()), x)
    assert not torch.allclose(parsed("train#draw_augment", ["train.json"], intensity_prob=1.0)(x.clone()), x)


@pytest.mark.parametrize(
    ("view_min_size", "view_max_size", "low", "high"),
    [([16, 8, 8], None, (16, 8, 8), (32, 24, 16)), ([-1, -1, 8], [-1, -1, 8], (32, 24, 8), (32, 24, 8))],
)
def test_each_feature_cache_draw_sees_its_own_field_of_view_of_image_and_label(view_min_size, view_max_size, low, high):
    """view_min_size / view_max_size: before each draw, image and label are cropped alike to a random size between
    the two (-1: the volume's size; no maximum: the volume) at a random place (MONAI RandSpatialCropd), e.g. thin
    slabs of the whole plane; the draw's features are those of that view, its crops come from its label."""
    with bundle_imports(BUNDLE):
        from scripts.probe import CachedFeaturePrepareBatch
    net = parsed("network_def").eval()
    net.extractor.backbone = per_voxel_backbone(4)
    assert parsed("train#draw_view", ["train.json"]) is None  # off by default: every draw sees the whole volume
    view = parsed("train#draw_view", ["train.json"], view_min_size=view_min_size, view_max_size=view_max_size)
    prepare = CachedFeaturePrepareBatch(net, patch_size=[8, 8, 8], draws=6, view=view)
    image = torch.rand(1, 4, 32, 24, 16) * 2 - 1
    image[:, 1] = torch.arange(32 * 24 * 16, dtype=torch.float32).reshape(32, 24, 16)  # a voxel id channel
    label = torch.randint(0, 3, (1, 1, 32, 24, 16))
    seen = []
    features = net.features
    net.features = lambda x, noise: seen.append(x) or features(x, noise)
    torch.manual_seed(0)
    pyramids, labels = prepare.volume(image, label)
    assert len(pyramids) == len(labels) == len(seen) == 6
    sizes = set()
    for x, pyramid, y in zip(seen, pyramids, labels, strict=True):
        assert pyramid[-1].shape[2:] == y.shape[2:] == x.shape[2:] and all(s % 8 == 0 for s in y.shape[2:])
        first = int(x[0, 1, 0, 0, 0])
        start = (first // (24 * 16), first // 16 % 24, first % 16)
        ids = x[0, 1].long() - first  # inside the view: the offset's id; in the edge-replicated padding: not
        size = tuple(
            int((line == torch.arange(len(line)) * step).sum())
            for line, step in ((ids[:, 0, 0], 384), (ids[0, :, 0], 16), (ids[0, 0, :], 1))
        )
        box = tuple(slice(st, st + n) for st, n in zip(start, size, strict=True))
        inner = tuple(slice(0, n) for n in size)
        torch.testing.assert_close(x[(0, slice(None), *inner)], image[(0, slice(None), *box)])
        assert torch.equal(y[(0, 0, *inner)], label[(0, 0, *box)])
        assert all(lo <= n <= hi for lo, n, hi in zip(low, size, high, strict=True)), size
        sizes.add((size, start))
    assert len(sizes) > 1  # the views differ (in size, or in place)


def test_training_volumes_are_padded_to_the_air_canvas(tmp_path):
    """pad_size: the training CT is padded with air (-1000 HU after the HU window, not the window's floor -1350 HU,
    which no scan of the evaluation has) to at least this size, label with 0."""
    write_dataset(tmp_path / "data", n=1)
    common = train_common(tmp_path, "unused")
    data = parsed("train_datalist", ["train.json"], **common)[0]
    out = parsed("train#preprocessing", ["train.json"], **common, feature_cache=True, pad_size=[48, 44, 0])(data)
    image, label = out["image"], out["label"]
    assert image.shape[1:] == (48, 44, 20) and label.shape[1:] == (48, 44, 20)
    air = (-1000 + 1350) / 2350 * 2 - 1  # -0.702
    for frame in (image[0, :4], image[0, :, :2]):
        assert (float(frame.min()), float(frame.max())) == pytest.approx((air, air), abs=1e-6)
    assert int(label[0, :4].max()) == 0
    assert int((label == 5).sum()) == 12 * 12 * 8  # the labelled box survives the padding intact


# ---- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.data
def test_demo_weights_segment_patient_b(tmp_path):
    """The shipped weights on the real DICOM series of patient B (demo.json, what `make demo` runs)."""
    run_bundle(BUNDLE, ["inference.json", "demo.json"], output_dir=str(tmp_path))
    (out,) = tmp_path.glob("*_seg.nii.gz")
    label = nib.load(out)
    assert label.shape == (512, 512, 20)
    values, counts = np.unique(np.asarray(label.dataobj), return_counts=True)
    assert set(values.tolist()) <= set(range(CLASSES)) and {0, 5}.issubset(set(values.tolist()))
    assert counts[values.tolist().index(5)] > 50_000  # liver (pseudo-label: 367k voxels)


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.xfail(
    strict=True,
    reason="issue 19: the 0.3.1 weights (55-min pretraining, 38-min head on the air canvas) reach liver 0.383 and a "
    "five-organ mean of 0.158 on patient B, plateaued; the feed-forward twin in the same budget 0.798 / 0.341 "
    "(model card); the marker goes when retrained weights meet the floors",
)
def test_shipped_weights_meet_the_patient_b_floors(tmp_path):
    """Issue 19's floors on patient B (never trained on, not in the pretraining data either): liver ≥ 0.75 and the
    mean over liver, spleen, stomach, aorta and IVC ≥ 0.45, evaluation grid, inference defaults."""
    dice = patient_b_dice(BUNDLE, tmp_path)
    assert dice["liver"] >= 0.75, dice
    assert np.mean([dice[o] for o in FIVE_ORGANS]) >= 0.45, dice


@pytest.mark.slow
@pytest.mark.data
def test_shipped_feedforward_twin_on_patient_b(tmp_path):
    """The twin (models/model_feedforward.pt: the same backbone and head trained end to end from random weights on
    patient A, the head's 45-minute budget): the card's liver 0.798 and five-organ mean 0.341 — the liver floor is
    within reach of this data and network trained directly, the five-organ floor is not in that budget."""
    twin = patient_b_dice(BUNDLE, tmp_path, extra=FEEDFORWARD[1:])
    assert twin["liver"] >= 0.75, twin
    assert np.mean([twin[o] for o in FIVE_ORGANS]) >= 0.32, twin


@pytest.mark.slow
def test_two_process_training_with_torchrun_on_cpu(tmp_path):
    """multi_gpu_train.json: DDP with the gloo backend on CPU, 2 processes, rank 0 saves the checkpoint."""
    write_dataset(tmp_path / "data", n=2)
    backbone = tmp_path / "backbone.pt"
    torch.save(parsed("backbone").state_dict(), backbone)
    run_torchrun(
        BUNDLE,
        tmp_path,
        **TINY,
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "out"),
        max_epochs=1,
        patch_size=[32, 32, 16],
        val_interval=0,
        cache_rate=0,
        backbone_ckpt=str(backbone),
    )
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state) and any(k.startswith("head.") for k in state)


def test_pretraining_scales_ct_by_the_hu_window_and_mr_by_its_percentiles():
    """pretrain.json's intensity step follows each datalist entry's "modality" (default CT): CT gets the HU window
    [-1350, 1000] → [-1, 1], MR (no Hounsfield units) its own 0.5-99.5 percentiles → [-1, 1]."""
    select = parsed("pretrain_intensity_transform", ["pretrain.json"])
    values = torch.linspace(-1350.0, 1000.0, 1001).reshape(1, 11, 91, 1)
    ct = select({"image": values.clone()})["image"]
    np.testing.assert_allclose(ct.flatten()[[0, 500, -1]].numpy(), [-1.0, (-175 + 1350) / 2350 * 2 - 1, 1.0], atol=1e-5)
    mr_values = torch.arange(1001.0).reshape(1, 11, 91, 1)  # arbitrary MR units 0..1000
    mr = select({"image": mr_values.clone(), "modality": "MR"})["image"]
    np.testing.assert_allclose(mr.flatten()[[5, 500, 995]].numpy(), [-1.0, 0.0, 1.0], atol=1e-5)
    with pytest.raises(ValueError, match="modality='PET': expected one of \\['CT', 'MR'\\]"):
        select({"image": values, "modality": "PET"})


@pytest.mark.data
def test_pretraining_data_leaves_patient_b_out(tmp_path):
    """Issue 19: the backbone pretrains on patients A and C and the MR, never on the evaluation image (patient B)."""
    with bundle_imports(BUNDLE):
        from scripts.prepare_data import prepare

        dataset = json.loads(prepare(tmp_path).read_text())
    pretraining = [(e["image"].split("totalsegmentator/")[-1], e["modality"]) for e in dataset["pretraining"]]
    assert pretraining == [("example_ct.nii.gz", "CT"), ("aorta_ct.nii.gz", "CT"), ("example_mr_sm.nii.gz", "MR")]
    assert dataset["validation"][0]["image"].endswith("example_ct_dicom")
