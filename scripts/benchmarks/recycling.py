"""Figures of recycling_ddpm_3d_segmentation: recycling step cost, lean U-Net vs MONAI's, seconds per volume."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet

from benchmarks import Figure, figure, ratio, timed
from diffseg.bundles import bundle_imports, bundle_parser

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "recycling_ddpm_3d_segmentation"


def _parsed(*ids: str, configs=("inference.json",), **override):
    with bundle_imports(BUNDLE):
        parser = bundle_parser(BUNDLE, configs, **override)
        return [parser.get_parsed_content(i) for i in ids]


@figure("recycling")
def recycling_figures(quick: bool) -> list[Figure]:
    """Recycling train step ÷ plain step; MONAI DiffusionModelUNet ÷ lean U-Net; seconds for 192×128×128."""
    figures = []
    # 1. one training step (prepare batch + forward + backward), demo patch size, with and without recycling
    patch = [64, 64, 16] if quick else [96, 96, 16]
    prepare, denoiser, loss = _parsed("train#prepare_batch", "denoiser", "loss", configs=("train.json",))
    classes = denoiser.net.head.conv.out_channels
    batch = {"image": torch.rand(2, 1, *patch), "label": torch.randint(0, classes, (2, 1, *patch))}

    def step(recycling: bool):
        prepare.recycling = recycling
        x_t, target, _, kwargs = prepare(batch)
        loss(denoiser(x_t, **kwargs), target).backward()

    repeats = 3 if quick else 5
    plain, recycled = timed(lambda: step(False), repeats), timed(lambda: step(True), repeats)
    figures.append(ratio("recycling_step_cost", recycled, plain, 1.45, higher_is_better=False, patch=patch))

    # 2. the paper's widths (32..256): MONAI DiffusionModelUNet vs the lean ImgX U-Net, one forward pass
    shape = [64, 64, 32] if quick else [96, 96, 64]
    (lean,) = _parsed("unet", unet_channels=[32, 64, 128, 256])
    monai_unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1 + classes,
        out_channels=classes,
        channels=(32, 64, 128, 256),
        attention_levels=(False, False, False, False),
        num_res_blocks=1,
        norm_num_groups=32,
    )
    x, t = torch.rand(1, 1 + classes, *shape), torch.tensor([2])
    with torch.no_grad():
        slow = timed(lambda: monai_unet.eval()(x, t), 2 if quick else 3)
        fast = timed(lambda: lean.eval()(x, t), 2 if quick else 3)
    figures.append(ratio("lean_unet_speedup", slow, fast, 3.0, shape=shape))

    # 3. absolute: one 192×128×128 volume, 5 steps, 1 sample, shipped network and inferer
    seg, inferer = _parsed("network_def", "inferer")
    volume = torch.rand(1, 1, 192, 128, 128) if not quick else torch.rand(1, 1, 96, 64, 64)
    run = timed(lambda: inferer(volume, seg), 1 if quick else 3, warmup=0)
    name = "recycling_volume_seconds" if not quick else "recycling_volume_seconds_96x64x64"
    figures.append(Figure(name, run.median, "s", "", None, run.spread, {"runs_s": run.runs}))
    return figures
