"""The segmenter contract through MONAI's own tools: config-built network_def, verify_net_in_out, DiffusionInferer."""

from __future__ import annotations

import json

import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet

from diffseg.ddpm import DDPMSampler

CONFIG = {
    "num_classes": 3,
    "num_inference_steps": 5,
    "num_samples": 2,
    "seed": 0,
    "unet": {
        "_target_": "monai.networks.nets.DiffusionModelUNet",
        "spatial_dims": 3,
        "in_channels": "$1 + @num_classes",
        "out_channels": "@num_classes",
        "channels": [8, 8],
        "attention_levels": [False, False],
        "num_res_blocks": 1,
        "norm_num_groups": 8,
    },
    "network_def": {
        "_target_": "diffseg.DiffusionSegmenter",
        "denoiser": {"_target_": "diffseg.ConcatDenoiser", "net": "@unet", "image_first": True},
        "scheduler": {
            "_target_": "diffseg.DDPMSampler",
            "num_train_timesteps": 5,
            "schedule": "respaced_beta",
            "prediction_type": "sample",
        },
        "codec": {"_target_": "diffseg.OneHotCodec", "num_classes": "@num_classes"},
        "num_inference_steps": "@num_inference_steps",
        "num_samples": "@num_samples",
        "aggregation": "vote",
        "seed": "@seed",
        "logits_output": True,
    },
}


def _tensor_format(fmt: str, channels: int, channel_def: dict[str, str]) -> dict:
    return {
        "type": "image",
        "format": fmt,
        "num_channels": channels,
        "spatial_shape": [16, 16, 8],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": channel_def,
    }


META = {
    "network_data_format": {
        "inputs": {"image": _tensor_format("hounsfield", 1, {"0": "image"})},
        "outputs": {"pred": _tensor_format("segmentation", 3, {"0": "background", "1": "organ a", "2": "organ b"})},
    }
}


def test_config_built_segmenter_passes_verify_net_in_out(tmp_path):
    (tmp_path / "inference.json").write_text(json.dumps(CONFIG, indent=4))
    (tmp_path / "metadata.json").write_text(json.dumps(META, indent=4))
    verify_net_in_out(
        "network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=str(tmp_path / "inference.json"),
        device="cpu",
    )  # raises on a shape or dtype mismatch
    parser = ConfigParser(CONFIG)
    net = parser.get_parsed_content("network_def")
    assert net.num_samples == 2 and net.scheduler.timesteps.numel() == 5
    assert all(k.startswith("denoiser.net.") for k in net.state_dict())  # plain, loadable state_dict


def test_diffseg_sampler_drives_monai_diffusion_inferer():
    """MONAI's own sampling loop accepts a diffseg sampler (StepOutput unpacks as MONAI's tuple)."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=2,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    )
    sched = DDPMSampler(1001, "linear_beta_f64", prediction_type="epsilon")
    sched.set_timesteps(5)
    inferer = DiffusionInferer(sched)
    noise = torch.randn(1, 1, 8, 8)
    out = inferer.sample(noise, unet, sched, conditioning=torch.rand(1, 1, 8, 8), mode="concat", verbose=False)
    assert out.shape == (1, 1, 8, 8) and bool(torch.isfinite(out).all())
