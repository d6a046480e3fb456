"""Training patches and inference windows agree in every bundle (the networks normalise per window: instance / group
norm statistics of a 192² window are not those of the 96² patches the network was trained on).

Configs are only parsed (``monai.bundle.ConfigParser``, plain ids resolved, nothing instantiated).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from bundle_testing import load_config

CROPS = {"RandCropByLabelClassesd": "spatial_size", "RandSpatialCropSamplesd": "roi_size"}


def resolve(bundle: str, configs: Sequence[str], item: str):
    return load_config(bundle, list(configs)).get_parsed_content(item)


def training_crop(bundle: str, configs: Sequence[str], transforms: str = "train#random_transforms") -> list[int]:
    """Spatial size of the random crop among ``transforms`` (the training patch)."""
    parser = load_config(bundle, list(configs))
    for i, transform in enumerate(parser.get(transforms)):
        key = isinstance(transform, dict) and CROPS.get(transform.get("_target_"))  # (or an "@id" reference)
        if key:
            return list(parser.get_parsed_content(f"{transforms}#{i}#{key}"))
    raise AssertionError(f"no random crop in {bundle} {configs} {transforms}")


RUNS = {  # training configs → the inference configs that ship with them
    "default": (["train.json"], ["inference.json"]),
    "demo": (["train.json", "train_demo.json"], ["inference.json", "demo.json"]),
    "paper": (["train.json", "paper.json"], ["inference.json", "paper.json"]),  # where a bundle has a paper.json
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_recycling_ddpm_trains_on_its_inference_window(run):
    """The demo and default 96×96×16 (the demo network's instance norms), the paper's whole 192×128×128 volumes."""
    bundle, (train, infer) = "recycling_ddpm_3d_segmentation", RUNS[run]
    patch = training_crop(bundle, train)
    assert patch == list(resolve(bundle, train, "validate#inferer#roi_size"))
    for inferer in ("window_inferer", "chain_per_window_inferer"):
        assert patch == list(resolve(bundle, infer, f"{inferer}#roi_size")), inferer
    assert resolve(bundle, infer, "chain_per_window_inferer#padding_mode") == "replicate"  # no zero slabs either


@pytest.mark.parametrize("run", ["default", "demo"])
def test_segdiff_trains_on_its_inference_window(run):
    bundle, (train, infer) = "segdiff_2d_segmentation", RUNS[run]
    patch = training_crop(bundle, train)
    assert patch == list(resolve(bundle, train, "validate#inferer#roi_size"))
    assert patch == list(resolve(bundle, infer, "inferer#roi_size"))
    assert patch == list(resolve(bundle, [*infer, "inference_slices.json"], "slice_inferer#roi_size"))


@pytest.mark.parametrize("run", sorted(RUNS))
def test_diffusion_probe_backbone_sees_its_inference_window(run):
    """The backbone's window: the training patch, or with ``feature_cache`` the whole-volume windows (``roi_size``)
    whose features the head's crops are cut from; and the pretraining patch the backbone learned its group norms on
    (``pretrain.json`` is the paper's 1×1×2 mm recipe, probed with ``paper.json``)."""
    bundle, (train, infer) = "diffusion_probe_3d_segmentation", RUNS[run]
    window = list(resolve(bundle, infer, "network_def#roi_size"))
    assert list(resolve(bundle, train, "network_def#roi_size")) == window
    if not resolve(bundle, train, "feature_cache"):
        assert training_crop(bundle, train) == window
    pretrain = {"demo": ["pretrain.json", "pretrain_demo.json"], "paper": ["pretrain.json"]}
    if run in pretrain:
        assert training_crop(bundle, pretrain[run], "pretrain#preprocessing#transforms") == window


@pytest.mark.parametrize("run", ["default", "demo"])
def test_sdseg_runs_on_whole_slices(run):
    """SDSeg has no window: it trains on single axial slices (padded to at least ``patch_size``, patient A's whole
    slices at 3 mm fit in 128²) and segments whole slices."""
    bundle, (train, infer) = "sdseg_latent_segmentation", RUNS[run]
    patch = list(resolve(bundle, train, "patch_size"))
    assert training_crop(bundle, train, "slice_transforms") == [*patch, 1]  # one slice per crop
    assert list(resolve(bundle, train, "validate#inferer#roi_size")) == [-1, -1]
    assert list(resolve(bundle, infer, "slice_inferer#roi_size")) == [-1, -1]
