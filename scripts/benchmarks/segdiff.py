"""SegDiff (bundles/segdiff_2d_segmentation): what the G(I) cache and the batched ensemble save on one image
(256², quick: 128²).

- ``segdiff_cache_speedup``: the N-sample chain with G(I) recomputed at every step for every sample ÷ with G(I)
  computed once per image (the bundle's default), both batched. Goal ≥ 3.
- ``ensemble_batch_speedup``: the N samples as N sequential chains (batch 1) ÷ one chain of batch N, both cached.
  Goal ≥ 1.3.

The network is the bundle's shipped (CPU-sized) configuration, built from its ``inference.json``. Each run samples
``steps`` reverse steps of the T = 100 chain (quick: 3, full: 20); ``details`` give seconds per image
extrapolated to the full T-step chain (``seconds × T / steps``; this overstates the cached run, which encodes once).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from benchmarks import Figure, figure, ratio, timed
from diffseg import BinaryCodec, DDPMSampler, DiffusionSegmenter

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segdiff_2d_segmentation"


def _bundle_network():
    """(denoiser, UncachedDenoiser class, T) from the bundle's inference.json, loaded without ``import scripts``."""
    spec = importlib.util.spec_from_file_location("segdiff_bundle_network", BUNDLE / "scripts" / "network.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    cfg = parser.get_parsed_content("denoiser_def", instantiate=False).get_config()
    args = {k: parser.get_parsed_content(f"denoiser_def#{k}") for k in cfg if not k.startswith("_")}
    torch.manual_seed(0)
    net = module.SegDiffDenoiser(**args).eval()
    weights = BUNDLE / "models" / "model.pt"
    if weights.exists():
        state = torch.load(weights, weights_only=True)
        net.load_state_dict({k.removeprefix("denoiser."): v for k, v in state.items()})
    return net, module.UncachedDenoiser, int(parser.get_parsed_content("num_train_timesteps"))


@figure("segdiff")
def segdiff(quick: bool) -> list[Figure]:
    net, uncached, t_train = _bundle_network()
    steps, samples, repeats, size = (3, 9, 2, 128) if quick else (20, 9, 3, 256)
    image = torch.randn(1, net.image_channels, size, size)
    sched = DDPMSampler(t_train, "improved_linear_beta")

    def run(denoiser, samples_per_batch=None):
        seg = DiffusionSegmenter(
            denoiser,
            sched,
            BinaryCodec(1),
            num_inference_steps=steps,
            num_samples=samples,
            seed=0,
            samples_per_batch=samples_per_batch,
        )
        return lambda: seg(image)

    with torch.no_grad():
        cached = timed(run(net), repeats=repeats)
        recompute = timed(run(uncached(net)), repeats=repeats)
        sequential = timed(run(net, samples_per_batch=1), repeats=repeats)
    scale = t_train / steps
    common = {"image": f"{size}x{size}", "samples": samples, "steps_timed": steps, "T": t_train}
    per_image = {
        "s_per_image_T_cached_batched": cached.median * scale,
        "s_per_image_T_uncached_batched": recompute.median * scale,
        "s_per_image_T_cached_sequential": sequential.median * scale,
    }
    return [
        ratio("segdiff_cache_speedup", recompute, cached, goal=3.0, **common, **per_image),
        ratio("ensemble_batch_speedup", sequential, cached, goal=1.3, **common, **per_image),
    ]
