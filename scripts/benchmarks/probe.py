"""Figures of diffusion_probe_3d_segmentation: seconds of feature extraction + head on one 3 mm abdominal CT."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import Figure, figure, timed
from diffseg.bundles import bundle_imports, bundle_parser
from diffseg.data import data_path

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "diffusion_probe_3d_segmentation"


@figure("probe")
def probe_figures(quick: bool) -> list[Figure]:
    """Patient A (122×101×112 at 3 mm) through the shipped network: window-averaged features at t = 10, 30, 60,
    then the FPN head; also the feature extraction alone."""
    with bundle_imports(BUNDLE):
        parser = bundle_parser(BUNDLE, ["inference.json"])
        net = parser.get_parsed_content("network_def").eval()
        net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
        preprocessing = parser.get_parsed_content("preprocessing")
        image = preprocessing({"image": str(data_path("totalsegmentator/example_ct.nii.gz"))})["image"]
    x = image.as_tensor()[None]  # (1, 4, 122, 101, 112): CT + 3 coordinate channels
    repeats = 1 if quick else 3
    with torch.no_grad():
        whole = timed(lambda: net(x), repeats, warmup=0)
        features = timed(lambda: net.features(torch.nn.functional.pad(x, (0, 0, 0, 3, 0, 6), mode="replicate")),
                         repeats, warmup=0)  # fmt: skip
    shape = list(x.shape[2:])
    return [
        Figure(
            "probe_volume_seconds", whole.median, "s", "", None, whole.spread, {"runs_s": whole.runs, "shape": shape}
        ),
        Figure("probe_features_seconds", features.median, "s", "", None, features.spread, {"runs_s": features.runs}),
    ]
