"""SDSeg (bundles/sdseg_latent_segmentation): what the single-step reverse process saves over DDIM.

- ``sdseg_onestep_speedup``: DDIM with 10 steps ÷ the single step, end to end on one volume (vision encoder once per
  slice, the steps, the kl-f8 decoder, slice by slice with the bundle's ``SliceInferer``). Goal ≥ 4.

The network is the bundle's shipped configuration and weights (``inference.json``, ``models/model.pt``). The volume
is patient B's size after the bundle's preprocessing (20 axial slices of 192², 3 mm in-plane, padded to 32);
``details`` also give seconds per 2D slice (one 192² slice through the segmenter) for 1 and 10 steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import Figure, figure, ratio, timed
from diffseg.bundles import bundle_imports, bundle_parser

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sdseg_latent_segmentation"


@figure("sdseg")
def sdseg_figures(quick: bool) -> list[Figure]:
    with bundle_imports(BUNDLE):
        parser = bundle_parser(BUNDLE, ("inference.json",))
        seg, inferer = parser.get_parsed_content("network_def"), parser.get_parsed_content("slice_inferer")
    weights = BUNDLE / "models" / "model.pt"
    if weights.exists():
        seg.load_state_dict(torch.load(weights, weights_only=True))
    seg.eval()
    size, slices = (192, 8) if quick else (192, 20)
    volume = torch.rand(1, 1, size, size, slices) * 2 - 1
    single = torch.rand(1, 1, size, size) * 2 - 1
    repeats = 2 if quick else 3

    def run(steps: int, image: torch.Tensor, sliced: bool):
        def call():
            seg.num_inference_steps = steps
            with torch.no_grad():
                return inferer(image, seg) if sliced else seg(image)

        return call

    one_vol, ddim_vol = timed(run(1, volume, True), repeats), timed(run(10, volume, True), repeats)
    one_2d, ddim_2d = timed(run(1, single, False), repeats), timed(run(10, single, False), repeats)
    details = {
        "volume": f"{size}x{size}x{slices}",
        "threads": torch.get_num_threads(),
        "s_per_volume_1_step": one_vol.median,
        "s_per_volume_ddim10": ddim_vol.median,
        "s_per_2d_slice_1_step": one_2d.median,
        "s_per_2d_slice_ddim10": ddim_2d.median,
        "slice_ratio": ddim_2d.median / one_2d.median,
    }
    seg.num_inference_steps = 1
    return [ratio("sdseg_onestep_speedup", ddim_vol, one_vol, goal=4.0, **details)]
