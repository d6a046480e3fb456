"""Unit tests of the MONAI Label app's tasks (scripts/monailabel_app/lib) without a server; need monailabel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# only in .venv-monailabel; a submodule, since tests/monailabel is itself importable as a namespace "monailabel"
pytest.importorskip("monailabel.interfaces.app")

from monai.inferers import SliceInferer  # noqa: E402

from diffseg.codecs import OneHotCodec  # noqa: E402
from diffseg.ddpm import DDPMSampler  # noqa: E402
from diffseg.segmenter import DiffusionSegmenter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "monailabel_app"))
from lib.bundles import ImageRejectedError, InvalidRequestError, check_readable, select_bundles  # noqa: E402
from lib.infer import UncertaintyRecorder, coerce_configs  # noqa: E402
from lib.scoring import as_probabilities  # noqa: E402

DEFAULTS = {"num_inference_steps": 5, "num_samples": 1, "seed": 0, "sw_overlap": 0.25, "window_consistent": True}


def test_coerce_configs_converts_request_strings_to_the_default_types():
    got = coerce_configs(DEFAULTS, {"num_inference_steps": "2", "seed": 3.0, "window_consistent": "false", "x": 1})
    assert got == {"num_inference_steps": 2, "seed": 3, "window_consistent": False}
    assert coerce_configs(DEFAULTS, {"seed": 0, "sw_overlap": "0.5"}) == {"seed": 0, "sw_overlap": 0.5}


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_inference_steps", "many"), ("num_inference_steps", 0), ("num_samples", 2.5), ("seed", -1),
     ("window_consistent", "maybe"), ("num_samples", True)],
)  # fmt: skip
def test_coerce_configs_rejects_wrong_types_and_ranges(key, value):
    with pytest.raises(InvalidRequestError, match=key):
        coerce_configs(DEFAULTS, {key: value})


def test_select_bundles_keeps_the_order_and_names_unknown_ones():
    available = {"a": Path("/a"), "b": Path("/b")}
    assert list(select_bundles(available, "b, a")) == ["b", "a"]
    assert select_bundles(available, "all") == available == select_bundles(available, None)
    with pytest.raises(ValueError, match=r"unknown bundle\(s\) \['c'\]; available: \['a', 'b'\]"):
        select_bundles(available, "a,c")


def test_check_readable_rejects_a_corrupt_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageRejectedError, match="bad.nii.gz: not a readable image"):
        check_readable(bad)


def test_as_probabilities_keeps_probabilities_and_softmaxes_logits():
    probs = torch.tensor([[0.2, 1.0], [0.8, 0.0]])
    assert torch.equal(as_probabilities(probs), probs)
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    torch.testing.assert_close(as_probabilities(logits), logits.softmax(0))


def segmenter(pointwise_denoiser, num_samples=3):
    den = pointwise_denoiser(spatial_dims=2)
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    return DiffusionSegmenter(den, sched, OneHotCodec(3), logits_output=True, num_samples=num_samples).eval()


def test_recorder_averages_the_calls_of_a_slice_inferer_over_all_voxels(pointwise_denoiser):
    """A 3D volume through MONAI's SliceInferer in 2 batches of slices: the score covers every slice equally."""
    net = segmenter(pointwise_denoiser)
    std_maps, entropies = [], []

    def keep(module, args, out):
        std_maps.append(module.last_uncertainty.std.mean(1).flatten())
        entropies.append(module.last_uncertainty.entropy.flatten())

    net.register_forward_hook(keep)
    recorder = UncertaintyRecorder(net)
    volume = torch.rand(1, 1, 6, 5, 3)  # 3 slices along the last axis; batches of 2 and 1 slice
    with torch.no_grad():
        SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=2)(volume, net)
    recorder.close()
    assert len(std_maps) == 2
    scores = recorder.scores()
    assert scores["std"] == pytest.approx(float(torch.cat(std_maps).mean()), rel=1e-6)
    assert scores["entropy"] == pytest.approx(float(torch.cat(entropies).mean()), rel=1e-6)
    assert scores["std"] > 0


def test_recorder_uses_last_uncertainty_when_the_inferer_calls_predict(pointwise_denoiser):
    net = segmenter(pointwise_denoiser)
    recorder = UncertaintyRecorder(net)
    out = net.predict(torch.rand(1, 1, 8, 8))  # as WindowConsistentInferer does: no forward() call
    net.last_uncertainty = out.uncertainty
    assert recorder.scores()["std"] == pytest.approx(float(out.uncertainty.std.mean()), rel=1e-6)
    assert UncertaintyRecorder(torch.nn.Conv2d(1, 1, 1)).scores() is None  # not a diffusion segmenter
