"""Window-consistent sampling: one global chain evaluated window by window equals the whole-image sampler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import SpatialPad

from diffseg.codecs import BinaryCodec, OneHotCodec
from diffseg.ddpm import DDPMSampler
from diffseg.denoiser import ConditionalDenoiser
from diffseg.segmenter import DiffusionSegmenter
from diffseg.sliding import WindowConsistentInferer, fit_window, pad_spatial
from diffseg.transforms import SegmenterUncertaintyd


def x0_segmenter(pointwise_denoiser, dims, **kw):
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    return DiffusionSegmenter(pointwise_denoiser(spatial_dims=dims), sched, OneHotCodec(3), logits_output=True, **kw)


def eps_segmenter(pointwise_denoiser, dims, **kw):
    den = pointwise_denoiser(channels=1, out_channels=1, spatial_dims=dims, timesteps=20)
    return DiffusionSegmenter(den, DDPMSampler(20, "improved_linear_beta"), BinaryCodec(1), **kw)


@pytest.mark.parametrize(
    ("make", "dims", "shape", "roi"),
    [
        (x0_segmenter, 3, (1, 1, 20, 14, 9), (8, 8, 8)),
        (x0_segmenter, 2, (2, 1, 23, 17), (8, 8)),
        (eps_segmenter, 2, (1, 1, 19, 21), (16, 8)),
    ],
)
def test_equals_whole_image_sampler_for_a_per_voxel_network(pointwise_denoiser, make, dims, shape, roi):
    seg = make(pointwise_denoiser, dims, num_samples=3, seed=7)
    image = torch.rand(shape)
    whole = seg(image)
    whole_std = seg.last_uncertainty.std
    windowed = WindowConsistentInferer(roi, sw_batch_size=2, overlap=0.5)(image, seg)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)  # no seams anywhere
    torch.testing.assert_close(seg.last_uncertainty.std, whole_std, atol=1e-5, rtol=1e-5)


def test_per_window_chains_disagree_where_windows_meet(pointwise_denoiser):
    """The Diff-UNet way (a chain per window) is not the whole-image sample: the reason for the default."""
    seg = x0_segmenter(pointwise_denoiser, 2, seed=7)
    image = torch.rand(1, 1, 24, 24)
    whole = seg(image)
    per_window = SlidingWindowInferer((12, 12), overlap=0.5, mode="gaussian")(image, seg)
    assert (per_window - whole).abs().max() > 1e-2


def test_conditioning_once_per_window_and_members_batched(pointwise_denoiser, spy_denoise):
    seg = x0_segmenter(pointwise_denoiser, 2, num_samples=4)
    calls = spy_denoise(seg)
    WindowConsistentInferer((8, 8), overlap=0)(torch.rand(1, 1, 16, 16), seg)
    assert seg.denoiser.encode_calls == 4  # 4 windows, encoded once each for all 5 steps
    assert [x.shape[0] for x in calls] == [4] * 20  # 5 steps × 4 windows, each with the 4 members in one batch
    seg.denoiser.encode_calls = 0
    WindowConsistentInferer((8, 8), overlap=0, cache_condition=False)(torch.rand(1, 1, 16, 16), seg)
    assert seg.denoiser.encode_calls == 20


def test_rejects_what_it_cannot_run(pointwise_denoiser):
    with pytest.raises(TypeError, match="needs a DiffusionSegmenter"):
        WindowConsistentInferer(8)(torch.rand(1, 1, 8, 8), torch.nn.Identity())
    seg = x0_segmenter(pointwise_denoiser, 2, latent_decoder=lambda z: z)
    with pytest.raises(ValueError, match="pixel space"):
        WindowConsistentInferer(8)(torch.rand(1, 1, 8, 8), seg)


def test_uncertainty_transform_carries_the_prediction_metadata(pointwise_denoiser):
    seg = x0_segmenter(pointwise_denoiser, 2, num_samples=3)
    image = torch.rand(1, 1, 8, 6)
    pred = MetaTensor(seg(image)[0], meta={"filename_or_obj": "case.nii.gz"})
    out = SegmenterUncertaintyd("uncertainty", seg)({"pred": pred})
    assert out["uncertainty"].shape == (1, 8, 6) and out["uncertainty"].meta["filename_or_obj"] == "case.nii.gz"
    torch.testing.assert_close(out["uncertainty"].as_tensor(), seg.last_uncertainty.std.mean(dim=1))
    entropy = SegmenterUncertaintyd("u", seg, measure="entropy")({"pred": pred})["u"]
    torch.testing.assert_close(entropy.as_tensor(), seg.last_uncertainty.entropy[:, 0])
    with pytest.raises(ValueError, match="measure='var'"):
        SegmenterUncertaintyd("u", seg, measure="var")
    seg(torch.rand(2, 1, 8, 6))
    with pytest.raises(ValueError, match="batch size 1"):
        SegmenterUncertaintyd("u", seg)({"pred": pred})


def test_metatensor_input_keeps_its_metadata(pointwise_denoiser):
    seg = x0_segmenter(pointwise_denoiser, 2)
    image = MetaTensor(torch.rand(1, 1, 8, 8), meta={"filename_or_obj": "case.nii.gz"})
    out = WindowConsistentInferer(8)(image, seg)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.nii.gz"


def test_window_shrinks_to_a_small_image_rounded_to_the_network_multiple(pointwise_denoiser, spy_denoise):
    seg = x0_segmenter(pointwise_denoiser, 2)
    image = torch.rand(1, 1, 20, 9)
    whole = seg(image)
    calls = spy_denoise(seg)
    out = WindowConsistentInferer((64, 64), size_divisible=8)(image, seg)
    assert {tuple(x.shape[2:]) for x in calls} == {(24, 16)}  # not 64×64: the image rounded up to multiples of 8
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="size_divisible=0"):
        WindowConsistentInferer(8, size_divisible=0)
    with pytest.raises(TypeError, match="overlapp"):
        WindowConsistentInferer(8, overlapp=0.5)


def test_stitched_uncertainty_covers_every_slice_of_a_slice_inferer(pointwise_denoiser):
    from monai.inferers import SliceInferer

    from diffseg.sliding import StitchedUncertaintyInferer

    seg = x0_segmenter(pointwise_denoiser, 2, num_samples=3, seed=7)
    volume = torch.rand(1, 1, 12, 10, 5)
    slices = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=2)
    plain = slices(volume, seg)
    assert seg.last_uncertainty.std.shape[0] == 1  # only the last slice batch (slice 4) is left behind
    stitched = StitchedUncertaintyInferer(slices)(volume, seg)
    torch.testing.assert_close(stitched, plain)  # the scores are untouched
    maps = seg.last_uncertainty
    assert maps.std.shape == (1, 3, 12, 10, 5) and maps.entropy.shape == (1, 1, 12, 10, 5)
    for k in range(5):  # each slice's maps are those of the call that segmented it (batches of 2 slices, one seed)
        first = 2 * (k // 2)
        seg(volume[0, :, :, :, first : first + 2].permute(3, 0, 1, 2))
        torch.testing.assert_close(maps.std[0, :, :, :, k], seg.last_uncertainty.std[k - first])
        torch.testing.assert_close(maps.entropy[0, :, :, :, k], seg.last_uncertainty.entropy[k - first])
    assert maps.std.max() > 0


class WindowNormDenoiser(ConditionalDenoiser):
    """Deterministic, ignores x_t: logits ±(image − window mean) / window std, so a voxel's label depends on the
    statistics of its whole window (as instance / group norm do); ``windows`` records every image window seen."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[torch.Tensor] = []

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        self.windows.append(image)
        dims = tuple(range(2, image.ndim))
        return (image - image.mean(dims, keepdim=True)) / image.std(dims, keepdim=True)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([-features, features], dim=1)


def window_norm_segmenter(denoiser: ConditionalDenoiser | None = None) -> DiffusionSegmenter:
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    return DiffusionSegmenter(denoiser or WindowNormDenoiser(), sched, OneHotCodec(2), logits_output=True, seed=0)


class InstanceNormDenoiser(WindowNormDenoiser):
    """The window statistics by torch's instance norm (as the U-Nets' norm layers), which needs > 1 voxel."""

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(image)


def test_an_image_too_small_for_the_network_gets_an_error_naming_its_size():
    seg = window_norm_segmenter(InstanceNormDenoiser())
    inferer = WindowConsistentInferer((16, 16, 16))
    assert inferer(torch.rand(1, 1, 3, 2, 2), seg).shape == (1, 2, 3, 2, 2)
    with pytest.raises(
        ValueError, match=r"spatial size \(1, 1, 1\) .* too small for this network: its window \[1, 1, 1\]"
    ):
        inferer(torch.rand(1, 1, 1, 1, 1), seg)


def test_thin_volume_gives_the_labels_of_the_same_volume_padded_by_hand():
    """8 slices, window 16 (divisibility 16): the remainder is edge-replicated, as padding by hand would be."""
    image = torch.linspace(0, 1, 8).expand(1, 1, 16, 16, 8) + 0.1 * torch.rand(1, 1, 16, 16, 8)
    seg = window_norm_segmenter()
    inferer = WindowConsistentInferer((16, 16, 16), size_divisible=16, overlap=0.25)
    labels = inferer(image, seg).argmax(1)
    by_hand = SpatialPad((16, 16, 16), mode="replicate")(image[0])[None]  # symmetric, as sliding_window_inference
    assert by_hand.shape == (1, 1, 16, 16, 16) and torch.equal(by_hand[..., 4:12], image)
    padded_labels = inferer(by_hand, seg).argmax(1)[..., 4:12]
    assert torch.equal(labels, padded_labels)
    zeros = WindowConsistentInferer((16, 16, 16), size_divisible=16, padding_mode="constant")(image, seg).argmax(1)
    assert not torch.equal(zeros, labels)  # the test can tell: zero slabs shift the window statistics


def test_no_zero_is_padded_into_a_window():
    image = 1 + torch.rand(1, 1, 20, 12, 5)  # no voxel below 1
    seg = window_norm_segmenter()
    WindowConsistentInferer((16, 16, 16), size_divisible=8)(image, seg)
    assert {tuple(w.shape[2:]) for w in seg.denoiser.windows} == {(16, 16, 8)}  # z: 5 slices → a window of 8
    assert all(float(w.min()) >= 1 for w in seg.denoiser.windows)


def test_fit_window_and_pad_spatial():
    assert fit_window((96, 96, 16), (333, 333, 8), 16) == [96, 96, 16]
    assert fit_window(64, (20, 9), 8) == [24, 16]
    x = torch.rand(2, 3, 5, 7)
    padded, crop = pad_spatial(x, (8, 4))
    assert padded.shape == (2, 3, 8, 7) and torch.equal(padded[crop], x)
    torch.testing.assert_close(padded[:, :, 5:], x[:, :, 4:5].expand(2, 3, 3, 7))  # edge replication at the end
    same, crop = pad_spatial(x, (5, 7))
    assert torch.equal(same, x) and torch.equal(same[crop], x)
