"""The segmenter contract: image → scores with the sampler inside; seeds, batching, conditioning once."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from diffseg.codecs import BinaryCodec, OneHotCodec
from diffseg.ddim import DDIMSampler
from diffseg.ddpm import DDPMSampler
from diffseg.segmenter import DiffusionSegmenter


def make(pointwise_denoiser, spatial_dims=2, **kw):
    den = pointwise_denoiser(spatial_dims=spatial_dims)
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    return DiffusionSegmenter(den, sched, OneHotCodec(3), logits_output=True, **kw)


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 1, 12, 10)), (3, (1, 1, 6, 8, 4))])
def test_output_is_per_class_scores(pointwise_denoiser, dims, shape):
    seg = make(pointwise_denoiser, dims, num_samples=3)
    out = seg(torch.rand(shape))
    assert out.shape == (shape[0], 3, *shape[2:]) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(shape[0], *shape[2:]))
    assert seg.last_uncertainty.std.shape == out.shape
    assert seg.last_uncertainty.entropy.shape == (shape[0], 1, *shape[2:])


def test_same_seed_identical_different_seed_differs(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=2)
    image = torch.rand(1, 1, 16, 16)
    a, b = seg(image), seg(image)
    assert torch.equal(a, b)
    seg.seed = 1
    assert not torch.allclose(a, seg(image))


def test_conditioning_once_and_samples_batched(pointwise_denoiser, spy_denoise):
    seg = make(pointwise_denoiser, num_samples=4)
    calls = spy_denoise(seg)
    seg(torch.rand(2, 1, 8, 8))
    assert seg.denoiser.encode_calls == 1  # G(I) once per forward, for all steps and samples
    assert [x.shape[0] for x in calls] == [8] * 5  # 5 steps, each one batch of B·N = 2·4 chains


def test_samples_per_batch_chunks_but_keeps_the_result_shape(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=4, samples_per_batch=3)
    out = seg.predict(torch.rand(2, 1, 8, 8))
    assert out.samples.shape == (2, 4, 3, 8, 8) and out.probs.shape == (2, 3, 8, 8)


def test_mean_and_vote_aggregation(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=5)
    res = seg.predict(torch.rand(1, 1, 8, 8))
    torch.testing.assert_close(res.probs, res.samples.mean(1))
    seg.aggregation = "vote"
    votes = seg.predict(torch.rand(1, 1, 8, 8)).probs
    assert set((votes * 5).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_single_sample_has_zero_std(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=1)
    seg(torch.rand(1, 1, 8, 8))
    assert seg.last_uncertainty.std.abs().max().item() == 0.0


def test_uncertainty_does_not_change_pred(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=3)
    image = torch.rand(1, 1, 8, 8)
    assert torch.equal(seg(image), seg.predict(image).probs)


def test_sliding_window_inferer_uses_the_segmenter_unchanged(pointwise_denoiser):
    seg = make(pointwise_denoiser, num_samples=2)
    inferer = SlidingWindowInferer(roi_size=(8, 8), sw_batch_size=2, overlap=0.25, mode="gaussian")
    out = inferer(torch.rand(1, 1, 20, 14), seg)
    assert out.shape == (1, 3, 20, 14)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 20, 14), rtol=1e-5, atol=1e-5)


def test_epsilon_binary_single_step(pointwise_denoiser):
    den = pointwise_denoiser(channels=1, out_channels=1, timesteps=1000)
    seg = DiffusionSegmenter(den, DDIMSampler(1000, "scaled_linear_beta_f64"), BinaryCodec(1), num_inference_steps=1)
    out = seg(torch.rand(1, 1, 8, 8))
    assert out.shape == (1, 2, 8, 8) and bool(((out >= 0) & (out <= 1)).all())


def test_latent_decoder_and_downsample(pointwise_denoiser):
    den = pointwise_denoiser(channels=4, out_channels=4, timesteps=10)
    den.encode_condition = lambda image: torch.nn.functional.avg_pool2d(torch.tanh(den.encoder(image)), 8)

    def decoder(z):  # latent (B, 4, h, w) → RGB mask space (B, 3, 8h, 8w)
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8)

    seg = DiffusionSegmenter(
        den, DDIMSampler(10), BinaryCodec(3), sample_channels=4, latent_decoder=decoder, latent_downsample=8
    )
    assert seg(torch.rand(1, 1, 16, 24)).shape == (1, 2, 16, 24)
    with pytest.raises(ValueError, match="divisible by latent_downsample=8"):
        seg(torch.rand(1, 1, 12, 24))


def test_bad_inputs_and_settings(pointwise_denoiser):
    seg = make(pointwise_denoiser)
    image = torch.rand(1, 1, 8, 8)
    image[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        seg(image)
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        seg(torch.rand(8, 8))
    with pytest.raises(ValueError, match="aggregation='median'"):
        make(pointwise_denoiser, aggregation="median")
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        DiffusionSegmenter(seg.denoiser, DDPMSampler(5), OneHotCodec(3), logits_output=True)
