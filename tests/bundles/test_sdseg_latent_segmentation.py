"""sdseg_latent_segmentation: the bundle contract, SDSeg's numbers, the kl-f8 importer, slice-wise geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_testing import (
    BUNDLES,
    FEEDFORWARD,
    bad_volume_cases,
    bad_volume_folder,
    bundle_imports,
    check_feedforward_input,
    check_metadata,
    check_net_in_out,
    check_resumable_training,
    dice,
    error_text,
    infer_images,
    load_config,
    random_ct,
    read_nifti,
    run_bundle,
    run_torchrun,
    save_weights,
    train_and_evaluate_twin,
    write_nifti,
)
from monai.networks.nets import DiffusionModelUNet

BUNDLE = "sdseg_latent_segmentation"
TINY = {
    "ae_channels": [8, 8, 8, 8],
    "ae_norm_num_groups": 4,
    "unet_channels": [8, 8],
    "unet_attention_levels": [False, True],
    "unet_num_head_channels": 8,
    "unet_norm_num_groups": 4,
}


def parsed(*ids, configs=("inference.json",), **override):
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, configs, **{**TINY, **override})
        return [parser.get_parsed_content(i) for i in ids]


def tiny_weights(tmp_path, **override) -> str:
    """A random tiny network's plain state_dict (what the shipped model.pt is, at demo size)."""
    (net,) = parsed("network_def", **override)
    return save_weights(net, tmp_path / "tiny.pt")


def infer(tmp_path, images, configs=("inference.json",), **override):
    ckpt = override.pop("ckpt_path", None) or tiny_weights(tmp_path)
    return infer_images(BUNDLE, tmp_path, images, configs, **{**TINY, "ckpt_path": ckpt, **override})


def test_metadata_and_network_contract():
    check_metadata(BUNDLE)
    check_net_in_out(BUNDLE, **TINY)


def test_shipped_weights_are_a_plain_state_dict_with_the_latent_scale():
    models = BUNDLES / BUNDLE / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())
    with bundle_imports(BUNDLE):
        net = load_config(BUNDLE).get_parsed_content("network_def")
    net.load_state_dict(state)  # strict: the default inference.json is the shipped network
    scale = float(state["latent_decoder.scale_factor"])
    assert scale > 0 and abs(scale - 1.0) > 1e-3 and abs(scale - 0.18215) > 1e-3  # set by scale_by_std
    ae = torch.load(models / "autoencoder.pt", weights_only=True)  # the frozen first stage inside model.pt
    for k, v in ae.items():
        torch.testing.assert_close(state[f"latent_decoder.autoencoder.{k}"], v, rtol=0, atol=0)
    assert (models / "model.pt").stat().st_size < 20e6


def test_scaled_linear_schedule_values():
    for configs in (("inference.json",), ("train.json",)):
        (sched,) = parsed("scheduler", configs=configs)
        acp = sched.alphas_cumprod64
        assert acp.dtype == torch.float64 and acp.shape == (1000,)
        assert float(acp[0]) == pytest.approx(0.9985, abs=1e-6)
        assert float(acp[999]) == pytest.approx(6.69e-4, rel=2e-3)
        sched.set_timesteps(1)
        assert sched.timesteps.tolist() == [999]


def latent_target(sched) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A LatentPrepareBatch-style target: latents (4, 4, 6, 6) at t = 0, 10, 500, 999, and their ᾱ_t (4, 1, 1, 1)."""
    torch.manual_seed(0)
    z0, eps = torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6)
    t = torch.tensor([0, 10, 500, 999])
    target = {"x0": z0, "noise": eps, "x_t": sched.add_noise(z0, eps, t), "timesteps": t}
    return target, sched.alphas_cumprod64[t].float().view(-1, 1, 1, 1)


def test_latent_estimation_identity_and_loss():
    """The paper's ε-prediction: L1(ε̂, ε) + L1(ẑ0, z0) with ẑ0 = (z_t − √(1−ᾱ) ε̂)/√ᾱ."""
    (sched, loss) = parsed("scheduler", "loss", configs=("train.json",), prediction_type="epsilon")
    target, acp = latent_target(sched)
    z0, eps, t, z_t = target["x0"], target["noise"], target["timesteps"], target["x_t"]
    torch.testing.assert_close(sched.predict_x0(eps, t, z_t), z0, atol=1e-4, rtol=1e-4)
    assert float(loss(eps, target)) == pytest.approx(0.0, abs=1e-4)
    off = eps + 0.1
    z0_hat = (z_t - (1 - acp).sqrt() * off) / acp.sqrt()
    expected = 0.1 + loss.seg_weight * float((z0_hat - z0).abs().mean())
    assert float(loss(off, target)) == pytest.approx(expected, rel=1e-4)
    assert loss.seg_weight == 1.0


def test_latent_estimation_loss_with_v_prediction_is_the_same_loss_on_derived_eps_and_z0():
    """v-prediction keeps SDSeg's loss L1(ε̂, ε) + L1(ẑ0, z0), with ẑ0 = √ᾱ z_t − √(1−ᾱ) v̂ and ε̂ = √(1−ᾱ) z_t + √ᾱ v̂;
    the true v = √ᾱ ε − √(1−ᾱ) z0 scores 0, and at t = 999 an error in v̂ costs ~1× in ẑ0 (38.7× for ε̂)."""
    (sched, loss) = parsed("scheduler", "loss", configs=("train.json",))  # the default: v-prediction
    target, acp = latent_target(sched)
    z0, eps, z_t = target["x0"], target["noise"], target["x_t"]
    v = acp.sqrt() * eps - (1 - acp).sqrt() * z0
    assert float(loss(v, target)) == pytest.approx(0.0, abs=1e-4)
    off = v + 0.1
    eps_err = float(((1 - acp).sqrt() * z_t + acp.sqrt() * off - eps).abs().mean())
    z0_err = float((acp.sqrt() * z_t - (1 - acp).sqrt() * off - z0).abs().mean())
    assert float(loss(off, target)) == pytest.approx(eps_err + z0_err, rel=1e-3)
    last = {k: x[-1:] for k, x in target.items()}  # t = 999 alone
    assert float(loss(v[-1:] + 0.1, last)) == pytest.approx(0.1 * (acp[-1].sqrt() + (1 - acp[-1]).sqrt()), rel=1e-3)


def test_training_and_inference_default_to_what_the_shipped_weights_predict():
    for configs in (("inference.json",), ("train.json",)):
        assert parsed("prediction_type", configs=configs) == ["v_prediction"]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_single_step_inference_is_the_closed_form(prediction_type):
    """1 step at t = 999: ẑ0 = √ᾱ·z_T − √(1−ᾱ)·v̂ (the shipped v-prediction) or (z_T − √(1−ᾱ)·ε̂)/√ᾱ (the paper's
    ε), decode, clamp((x+1)/2), mean over 3 channels."""
    (seg,) = parsed("network_def", prediction_type=prediction_type)
    seg.eval()
    image = torch.rand(2, 1, 32, 48) * 2 - 1
    scores = seg(image)
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn((2, 4, 4, 6), generator=gen)
    with torch.no_grad():
        c = seg.denoiser.vision_encoder(image)
        out = seg.denoiser.unet(torch.cat([z_t, c], 1), torch.full((2,), 999))
        acp = float(seg.scheduler.alphas_cumprod64[999])
        if prediction_type == "epsilon":
            z0 = (z_t - (1 - acp) ** 0.5 * out) / acp**0.5
        else:
            z0 = acp**0.5 * z_t - (1 - acp) ** 0.5 * out
        fg = ((seg.latent_decoder.autoencoder.decode(z0 / seg.latent_decoder.scale_factor) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(scores[:, 1:], fg.mean(1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert scores.shape == (2, 2, 32, 48)


def test_autoencoder_loss_dice_term_scores_the_decoded_mask():
    with bundle_imports(BUNDLE):
        from scripts.training import MaskAutoencoderLoss

    x = -torch.ones(2, 3, 8, 8)
    x[..., 2:6, 2:6] = 1.0
    mu, sigma = torch.zeros(2, 4, 1, 1), torch.ones(2, 4, 1, 1)  # KL = 0
    plain, dice = MaskAutoencoderLoss(dice_weight=0.0), MaskAutoencoderLoss(dice_weight=2.0)
    assert float(dice((x, mu, sigma), x)) == pytest.approx(0.0, abs=1e-5)  # perfect reconstruction
    assert float(dice((-x, mu, sigma), x)) == pytest.approx(2.0 + 2.0 * 1.0, abs=1e-4)  # L1 2, Dice of disjoint masks 1
    assert float(plain((-x, mu, sigma), x)) == pytest.approx(2.0)
    half = x.clone()
    half[..., 2:4, 2:6] = -1.0  # half the foreground lost: Dice 2/3 → loss 1/3 per unit weight
    expected = (half - x).abs().mean().item() + 2.0 * (1 - 2 * 8 / (8 + 16))
    assert float(dice((half, mu, sigma), x)) == pytest.approx(expected, abs=1e-4)


def test_zero_init_expansion_keeps_the_unconditional_output():
    with bundle_imports(BUNDLE):
        from scripts.network import load_zero_expanded

    kw = {"spatial_dims": 2, "out_channels": 4, "channels": (8, 16), "attention_levels": (False, True)}
    kw |= {"num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 4}
    torch.manual_seed(0)
    net4, net8 = DiffusionModelUNet(in_channels=4, **kw).eval(), DiffusionModelUNet(in_channels=8, **kw).eval()
    expanded = load_zero_expanded(net8, net4.state_dict())
    assert expanded == ["conv_in.conv.weight"]
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 999])
    with torch.no_grad():
        ref = net4(z, t)
        for cond in (torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), 7.0)):
            torch.testing.assert_close(net8(torch.cat([z, cond], 1), t), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot expand"):
        load_zero_expanded(net4, net8.state_dict())
    fresh = DiffusionModelUNet(in_channels=8, **kw)
    init = fresh.conv_in.conv.weight.detach().clone()
    load_zero_expanded(fresh, net4.state_dict(), zeros=False)  # the extra inputs keep the module's own init
    torch.testing.assert_close(fresh.conv_in.conv.weight[:, 4:], init[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(fresh.conv_in.conv.weight[:, :4], net4.conv_in.conv.weight, rtol=0, atol=0)


def test_vision_encoder_copies_the_autoencoder_encoder():
    (ae, venc) = parsed("autoencoder_def", "vision_encoder")
    torch.manual_seed(1)
    for p in ae.parameters():
        p.data.normal_()
    venc.init_from(ae)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(venc.encoder(x), ae.encoder(x))  # 8 channels: mean ‖ log-variance
        assert venc.encoder(x).shape == (2, 8, 4, 4) and venc(x[:, :1]).shape == (2, 4, 4, 4)
    assert venc.proj.conv.weight.shape == (4, 8, 1, 1)


def _diffusers_pair(channels=(8, 16, 32, 32), layers=2, groups=4):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
    ).eval()
    with bundle_imports(BUNDLE):
        from scripts.network import KLAutoencoder

        net = KLAutoencoder(channels, layers, latent_channels=4, norm_num_groups=groups).eval()
    return ref, net


def _check_same_outputs(ref, net):
    x, z = torch.randn(2, 3, 32, 48), torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mu, sigma = net.encode(x)
        torch.testing.assert_close(mu, post.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sigma, post.std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)


def _compvis_keys(state, levels):
    """diffusers → CompVis names (the inverse of the importer's renaming, checked below against diffusers' own
    CompVis → diffusers converter)."""
    import re

    out = {}
    for k, v in state.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            k,
        )
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        attn = re.match(r"^(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k)
        if attn:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attn[2]]
            k = f"{attn[1]}.mid.attn_1.{name}.{attn[3]}"
            v = v[:, :, None, None] if v.ndim == 2 else v
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[k] = v
    return out


def test_autoencoder_import_from_diffusers_names_is_exact():
    ref, net = _diffusers_pair()
    with bundle_imports(BUNDLE):
        from scripts.import_kl_f8 import import_checkpoint

        import_checkpoint(ref.state_dict(), net)
    _check_same_outputs(ref, net)


def test_autoencoder_import_from_compvis_names_is_exact():
    ref, net = _diffusers_pair()
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    compvis = _compvis_keys(ref.state_dict(), 4)
    compvis["loss.logvar"] = torch.zeros(())  # LDM checkpoints also hold their loss' parameters
    back = single_file.convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in compvis.items()}, ref.config)
    assert set(back) == set(ref.state_dict())  # our CompVis names are the ones diffusers converts
    with bundle_imports(BUNDLE):
        from scripts.import_kl_f8 import import_checkpoint

        import_checkpoint({"state_dict": {f"first_stage_model.{k}": v for k, v in compvis.items()}}, net)
    _check_same_outputs(ref, net)


def test_slice_wise_volume_output_keeps_the_input_geometry(tmp_path):
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    lps[:3, 3] = [40.0, 30.0, -20.0]
    images = {
        "a.nii.gz": (random_ct((50, 37, 7)), np.diag([3.0, 3.0, 5.0, 1.0])),
        "b.nii": (random_ct((61, 70, 5), 1), lps),
    }
    out = infer(tmp_path, images)
    for name, (array, affine) in images.items():
        label, label_affine = read_nifti(out / f"{name.split('.')[0]}_seg.nii.gz")
        assert label.shape == array.shape and label.dtype == np.uint8
        np.testing.assert_allclose(label_affine, affine, atol=1e-4)
        assert set(np.unique(label)) <= {0, 1}


def test_uncertainty_map_covers_every_slice_in_the_input_geometry(tmp_path):
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    images = {"a.nii.gz": (random_ct((50, 37, 7)), affine)}
    kw = {"save_uncertainty": True, "displayable_configs#num_samples": 3, "displayable_configs#slice_batch_size": 2}
    out = infer(tmp_path, images, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "a_uncertainty.nii.gz"]
    unc, unc_affine = read_nifti(out / "a_uncertainty.nii.gz")
    assert unc.shape == (50, 37, 7) and unc.dtype == np.float32
    np.testing.assert_allclose(unc_affine, affine, atol=1e-4)
    assert unc.min() >= 0 and unc.max() <= 0.5 + 1e-6  # std of probabilities in [0, 1]
    assert all(unc[..., k].max() > 0 for k in range(7))  # every slice batch's samples, not only the last one's


def test_2d_input_with_the_2d_override(tmp_path):
    images = {"slice.nii.gz": (random_ct((45, 38)), np.diag([0.7, 0.7, 1.0, 1.0]))}
    out = infer(tmp_path, images, configs=("inference.json", "inference_2d.json"))
    label, affine = read_nifti(out / "slice_seg.nii.gz")
    assert label.shape[:2] == (45, 38) and label.size == 45 * 38
    np.testing.assert_allclose(affine[:2, :2], np.diag([0.7, 0.7]), atol=1e-4)


def test_same_seed_gives_an_identical_label_file(tmp_path):
    images = {"a.nii.gz": (random_ct((40, 40, 4)), np.diag([2.0, 2.0, 5.0, 1.0]))}
    ckpt = tiny_weights(tmp_path)
    (tmp_path / "1").mkdir()

    def run(sub, **kw):
        return np.asarray(nib.load(infer(tmp_path / sub, images, ckpt_path=ckpt, **kw) / "a_seg.nii.gz").dataobj)

    first, second = run("1"), run("2")
    assert np.array_equal(first, second)
    with bundle_imports(BUNDLE):
        seg = load_config(BUNDLE, **TINY).get_parsed_content("network_def")
    seg.load_state_dict(torch.load(ckpt, weights_only=True))
    image = torch.rand(1, 1, 32, 32)
    a, b = seg(image), seg(image)
    seg.seed = 1
    assert torch.equal(a, b) and not torch.equal(a, seg(image))


@pytest.mark.parametrize(("case", "match"), bad_volume_cases())
def test_bad_inputs_fail_with_a_clear_error_naming_the_file(tmp_path, case, match):
    target = bad_volume_folder(tmp_path, case)
    with pytest.raises(Exception) as info:
        infer(tmp_path, {}, dataset_dir=str(target))
    assert match in error_text(info.value)


def write_dataset(root, n=2):
    """n tiny labelled volumes (a bright box = organ) and an MSD dataset.json (last one = validation)."""
    entries = []
    for i in range(n):
        image, label = random_ct((40, 40, 6), i), np.zeros((40, 40, 6), np.uint8)
        image[8:24, 10:30, 1:5], label[8:24, 10:30, 1:5] = 100, 1
        affine = np.diag([2.0, 2.0, 4.0, 1.0])
        write_nifti(root / f"img{i}.nii.gz", image, affine)
        write_nifti(root / f"lab{i}.nii.gz", label, affine)
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries[:-1], "validation": entries[-1:]}))


def train_common(tmp_path: Path) -> dict:
    """Overrides of a short training on :func:`write_dataset`'s volumes, checkpoints in ``tmp_path / "ckpt"``."""
    return {**TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "eval"), "patch_size": [32, 32], "slices_per_volume": 2}  # fmt: skip


def test_training_slices_are_padded_with_air_and_only_the_image_is_intensity_augmented():
    """``pad_size`` pads the scaled image with air (−1, the window's lower end) and the label with background before
    cropping; the intensity augmentation (``intensity_prob``) changes the image only."""
    image, label = torch.full((1, 20, 10, 3), 0.5), torch.zeros(1, 20, 10, 3)
    label[:, 5:15, 3:7] = 1
    (plain,) = parsed("slice_transforms", configs=("train.json",), pad_size=[24, 24], patch_size=[24, 24],
                      slices_per_volume=1, flip_prob=0.0)  # fmt: skip
    out = plain[0](plain[1]({"image": image.clone(), "label": label.clone()}))
    assert out["image"].shape == (1, 24, 24, 3) and out["label"].shape == (1, 24, 24, 3)
    assert float(out["image"][0, :2].max()) == -1.0 and float(out["image"][0, 2:22, 7:17].min()) == 0.5
    assert float(out["label"].sum()) == float(label.sum())
    (augmented,) = parsed("slice_transforms", configs=("train.json",), patch_size=[20, 10], slices_per_volume=1,
                          flip_prob=0.0, intensity_prob=1.0)  # fmt: skip
    from monai.transforms import Compose

    aug = Compose(augmented).set_random_state(0)
    sample = aug({"image": torch.linspace(-1, 1, 600).reshape(1, 20, 10, 3), "label": label.clone()})[0]
    assert sample["image"].shape == (1, 20, 10) and not torch.allclose(sample["image"], image[..., 0])
    torch.testing.assert_close(sample["label"].as_tensor(), label[..., 0], rtol=0, atol=0)


def test_autoencoder_slices_have_their_own_padding_flips_and_scaling():
    """``ae_pad_size`` / ``ae_flip_prob`` / ``ae_scale_range`` (default: the diffusion's values) set the mask
    autoencoder's slice augmentation; the diffusion training keeps ``pad_size`` / ``flip_prob`` / ``scale_range``."""
    ids = ("slice_transforms",)
    ae_ids = {"ae_pad_size": [0, 0], "ae_flip_prob": 0.25, "ae_scale_range": [0.1, 0.1]}
    common = {"pad_size": [192, 192], "flip_prob": 0.0, "scale_range": [0.3, 0.3]}
    for configs, ae_override, pad, flip, scale in (
        (("train.json", "train_autoencoder.json"), ae_ids, 128, 0.25, 0.1),
        (("train.json", "train_autoencoder.json"), {}, 192, 0.0, 0.3),
        (("train.json",), ae_ids, 192, 0.0, 0.3),
    ):
        (st,) = parsed(*ids, configs=configs, patch_size=[128, 128], **common, **ae_override)
        assert [t.padder.spatial_size[0] for t in st[:2]] == [pad, pad]
        assert [t.prob for t in st[4:6]] == [flip, flip]
        assert st[6].rand_affine.rand_affine_grid.scale_range == (scale, scale)


def test_evaluation_and_inference_pad_the_image_with_air(tmp_path):
    """Padding to the network's divisor is air (−1) in the evaluation and inference grids, not mid-grey (0 ≈ 37 HU)."""
    path = write_nifti(tmp_path / "img.nii.gz", np.full((30, 30, 2), 40.0, np.float32), np.diag([3.0, 3.0, 3.0, 1]))
    (pre,) = parsed("preprocessing")
    x = pre({"image": str(path)})["image"]
    assert x.shape[1] % 32 == 0 and x.shape[2] % 32 == 0
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx((40 + 175) / 425 * 2 - 1, abs=1e-5)


def test_autoencoder_and_diffusion_trainings_stop_and_resume(tmp_path):
    write_dataset(tmp_path / "data")
    common = train_common(tmp_path)
    check_resumable_training(
        BUNDLE, ["train.json", "train_autoencoder.json"], "ae_max_epochs", "autoencoder.pt",
        tmp_path / "eval" / "autoencoder", ae_val_interval=1, **common,
    )  # fmt: skip
    check_resumable_training(BUNDLE, ["train.json"], val_interval=1, ema_decay=0.5, **common)


def test_autoencoder_then_diffusion_training_then_evaluation(tmp_path):
    write_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    common = train_common(tmp_path)
    run_bundle(BUNDLE, ["train.json", "train_autoencoder.json"], ae_max_epochs=2, ae_val_interval=2, **common)
    ae = torch.load(ckpt / "autoencoder.pt", weights_only=True)
    assert "reconstruction" in (tmp_path / "eval" / "autoencoder" / "metrics.csv").read_text()
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, ["train.json"], max_epochs=2, val_interval=2, **common)
        parser.get_parsed_content("prepare_networks")
        latent, venc = parser.get_parsed_content("latent"), parser.get_parsed_content("vision_encoder")
        init = {k: v.clone() for k, v in venc.encoder.state_dict().items()}
        for k, v in init.items():  # initialised from the trained autoencoder's encoder
            torch.testing.assert_close(v, ae[f"encoder.{k}"], rtol=0, atol=0)
        seen = []
        prepare = parser.get_parsed_content("train#prepare_batch")
        real_call = prepare.latent.raw_latent
        prepare.latent.raw_latent = lambda x: seen.append(real_call(x)) or seen[-1]
        parser.get_parsed_content("train#trainer").run()
    assert len(seen) == 2  # 2 iterations
    assert float(latent.scale_factor) == pytest.approx(1 / float(seen[0].flatten().std()), rel=1e-5)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert float(state["latent_decoder.scale_factor"]) == pytest.approx(float(latent.scale_factor))
    for k, v in ae.items():  # frozen first stage
        torch.testing.assert_close(state[f"latent_decoder.autoencoder.{k}"], v, rtol=0, atol=0)
    assert any(not torch.equal(state[f"denoiser.vision_encoder.encoder.{k}"], v) for k, v in init.items())
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], ckpt_path=str(ckpt / "model.pt"), **common)
    metrics = (tmp_path / "eval" / "steps1" / "metrics.csv").read_text()
    for name in ("val_mean_dice", "val_hd95", "val_ece"):
        assert name in metrics
    configs = ["train.json", "evaluate.json", "evaluate_stability.json"]
    run_bundle(BUNDLE, configs, ckpt_path=str(ckpt / "model.pt"), stability_seeds=[0, 1], **common)
    report = json.loads((tmp_path / "eval" / "stability_steps1" / "stability.json").read_text())
    assert report["seeds"] == [0, 1] and len(report["dice_vs_label_per_seed"]) == 2
    for key in ("dice", "psnr", "ssim", "ms_ssim"):
        assert np.isfinite(report[key])


def test_unconditional_prior_then_zero_expanded_start(tmp_path):
    """train_unet_prior.json trains the 4-channel U-Net alone and ships its plain state_dict; train.json with
    ``unet_init_ckpt`` starts from it with zero conditioning weights (SDSeg's initialisation)."""
    write_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ae,) = parsed("autoencoder_def", configs=("train.json",))
    save_weights(ae, ckpt / "autoencoder.pt")
    common = train_common(tmp_path)
    run_bundle(BUNDLE, ["train.json", "train_unet_prior.json"], prior_max_epochs=2, curve_log_interval=1, **common)
    prior = torch.load(ckpt / "unet_prior.pt", weights_only=True)
    assert prior["conv_in.conv.weight"].shape[1] == 4  # z_t only
    assert not (ckpt / "model.pt").exists()
    assert (tmp_path / "eval" / "unet_prior" / "curve.csv").is_file()
    with bundle_imports(BUNDLE):
        parser = load_config(BUNDLE, ["train.json"], unet_init_ckpt=str(ckpt / "unet_prior.pt"), **common)
        parser.get_parsed_content("prepare_networks")
        unet = parser.get_parsed_content("unet_def")
    weight = unet.state_dict()["conv_in.conv.weight"]
    torch.testing.assert_close(weight[:, :4], prior["conv_in.conv.weight"], rtol=0, atol=0)
    assert weight.shape[1] == 8 and not weight[:, 4:].any()  # the image latent's weights start at zero
    for k, v in prior.items():
        if k != "conv_in.conv.weight":
            torch.testing.assert_close(unet.state_dict()[k], v, rtol=0, atol=0)


def test_feedforward_twin_predicts_the_latent_from_noise_and_evaluates_its_own_weights(tmp_path):
    """train_feedforward.json (paper 001, E1): the same vision encoder + U-Net called once on z_T noise at t = 999,
    predicting z0 (2·L1 in the latent), decoded by the same frozen autoencoder in one x0 step."""
    write_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ae,) = parsed("autoencoder_def", configs=("train.json",))
    save_weights(ae, ckpt / "autoencoder.pt")  # a random frozen first stage
    common = train_common(tmp_path)
    seg, loss = parsed("network_def", "loss", configs=FEEDFORWARD, **common)
    assert seg.num_inference_steps == 1 and seg.scheduler.prediction_type == "sample"
    z0 = torch.randn(2, 4, 4, 4)
    target = {
        "x0": z0,
        "noise": torch.randn_like(z0),
        "x_t": torch.randn_like(z0),
        "timesteps": torch.tensor([999] * 2),
    }
    assert float(loss(z0 + 0.1, target)) == pytest.approx(0.2, rel=1e-4)  # L1(ẑ0, z0) twice: simple + seg term
    label = torch.zeros(1, 1, 32, 32)
    label[..., 8:24, 8:24] = 1
    x, target, _, kwargs = check_feedforward_input(
        BUNDLE, {"image": torch.rand(1, 1, 32, 32) * 2 - 1, "label": label}, **common
    )
    assert x.shape == (1, 4, 4, 4) and target["x0"].shape == x.shape and kwargs["timesteps"].tolist() == [999]
    train_and_evaluate_twin(
        BUNDLE, tmp_path / "eval" / "steps1" / "metrics.csv", max_epochs=2, val_interval=2, **common
    )
    state = torch.load(ckpt / "model_feedforward.pt", weights_only=True)
    for k, v in torch.load(ckpt / "autoencoder.pt", weights_only=True).items():  # the same frozen first stage
        torch.testing.assert_close(state[f"latent_decoder.autoencoder.{k}"], v, rtol=0, atol=0)
    (infer_seg,) = parsed("network_def", configs=("inference.json", "inference_feedforward.json"))
    infer_seg.load_state_dict(state)  # inference.json + inference_feedforward.json runs the twin
    assert infer_seg.num_inference_steps == 1 and infer_seg.scheduler.prediction_type == "sample"


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.xfail(
    strict=True,
    reason="the 0.4.0 v-prediction weights (139 of 150 training minutes) give Dice 0.794 (DICOM grid 0.796), "
    "plateaued at 0.78-0.82 from 20 minutes on; the feed-forward twin 0.847 (issue 18)",
)
def test_shipped_weights_segment_patient_b_in_the_evaluation_grid(tmp_path):
    """Issue 18's floor: the shipped weights with the inference defaults (one step from t = 999), binary organ Dice
    ≥ 0.80 on patient B (never trained on) in the bundle's evaluation grid (3 mm in-plane, evaluate.json)."""
    with bundle_imports(BUNDLE):
        from scripts.prepare_data import prepare
    prepare(tmp_path / "data")
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path))
    lines = (tmp_path / "steps1" / "metrics.csv").read_text().replace("\t", ",").splitlines()
    rows = dict(line.split(",", 1) for line in lines if "," in line)
    assert float(rows["val_mean_dice"]) >= 0.80
    label, ref = demo_label_and_reference(tmp_path / "demo")  # the same floor in B's original DICOM grid
    assert dice(label, ref) >= 0.80


def demo_label_and_reference(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Run demo.json (patient B's DICOM series) into ``tmp_path``; return its label and the union of the 8 organs of
    B's pseudo-label map, both in RAS in B's original grid (the reference is LAS on disk)."""
    from diffseg.data import data_path

    run_bundle(BUNDLE, ["inference.json", "demo.json"], output_dir=str(tmp_path))
    (out,) = tmp_path.glob("*_seg.nii.gz")
    written = nib.as_closest_canonical(nib.load(out))
    with bundle_imports(BUNDLE):
        from scripts.prepare_data import binary_foreground
    binary_foreground(data_path("totalsegmentator/example_seg_dicom.nii.gz"), tmp_path / "ref.nii.gz")
    ref = nib.as_closest_canonical(nib.load(tmp_path / "ref.nii.gz"))
    np.testing.assert_allclose(ref.affine, written.affine, atol=1e-3)
    return np.asarray(written.dataobj), np.asarray(ref.dataobj)


@pytest.mark.slow
@pytest.mark.data
def test_demo_weights_segment_patient_b(tmp_path):
    """The shipped weights on the real DICOM series of patient B (demo.json, what `make demo` runs)."""
    label, _ = demo_label_and_reference(tmp_path)
    assert label.shape == (512, 512, 20) and set(np.unique(label).tolist()) == {0, 1}
    fraction = label.mean()
    assert 0.02 < fraction < 0.5  # organs, not empty, not everything (pseudo-label: 0.11)


@pytest.mark.slow
def test_two_process_training_with_torchrun_on_cpu(tmp_path):
    """multi_gpu_train.json: DDP with the gloo backend on CPU, 2 processes, rank 0 saves the checkpoint."""
    write_dataset(tmp_path / "data", n=3)
    ckpt = tmp_path / "ckpt"
    run_bundle(
        BUNDLE,
        ["train.json", "train_autoencoder.json"],
        **TINY,
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "ae"),
        patch_size=[32, 32],
        slices_per_volume=2,
        ae_max_epochs=1,
        ae_val_interval=0,
    )
    run_torchrun(
        BUNDLE,
        tmp_path,
        **TINY,
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(ckpt),
        output_dir=str(tmp_path / "out"),
        max_epochs=1,
        val_interval=0,
        patch_size=[32, 32],
        slices_per_volume=2,
    )
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state) and "latent_decoder.scale_factor" in state
