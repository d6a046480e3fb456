"""DDPM / DDIM / single-step samplers: ImgX numbers, agreement with MONAI, correct strided neighbours."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from diffseg.ddim import DDIMSampler
from diffseg.ddpm import DDPMSampler
from diffseg.sampling import sample, sample_progressive
from diffseg.schedules import alphas_cumprod, make_betas

SHAPES = [(2, 3, 8, 8), (2, 3, 6, 6, 4)]


def imgx_sampler(**kw) -> DDPMSampler:
    """ImgX-DiffSeg v0.1.0: 1001 linear betas, strided to 5 steps, x0-prediction, fixed-large variance."""
    s = DDPMSampler(1001, "linear_beta_f64", prediction_type="sample", **kw)
    s.set_timesteps(5)
    return s


def test_imgx_posterior_coefficients_and_variances():
    s = imgx_sampler()
    ascending = [0, 250, 500, 750, 1000]
    coefs = [s.posterior_coefficients(t) for t in ascending]
    assert [c[0] for c in coefs] == pytest.approx([1, 0.99984, 0.6663, 0.2683, 0.0569], abs=1e-4)
    assert [c[1] for c in coefs] == pytest.approx([0, 1.5e-4, 0.2005, 0.1908, 0.1094], abs=1e-4)
    assert s.variances().tolist() == pytest.approx([1.0e-4, 0.478, 0.851, 0.957, 0.988], abs=1e-3)
    assert s.step_variance(0) == 0.0  # the last step adds no noise


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_strided_ddpm_equals_monai_on_the_respaced_chain(shape, variance_type, prediction_type):
    ours = DDPMSampler(1001, "linear_beta_f64", variance_type=variance_type, prediction_type=prediction_type)
    ours.set_timesteps(5)
    monai = DDPMScheduler(
        5, "respaced_beta", variance_type=variance_type, prediction_type=prediction_type, clip_sample=False
    )
    monai.set_timesteps(5)
    torch.manual_seed(0)
    x_ours = x_monai = torch.randn(shape)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t_ours, t_monai in zip(ours.timesteps.tolist(), monai.timesteps.tolist(), strict=True):
        out = torch.tanh(x_ours) * 0.5  # any deterministic "model"
        x_ours, x0_ours = ours.step(out, t_ours, x_ours, generator=g1)
        x_monai, x0_monai = monai.step(torch.tanh(x_monai) * 0.5, t_monai, x_monai, generator=g2)
        torch.testing.assert_close(x0_ours, x0_monai, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_ours, x_monai, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_strided_ddim_equals_monai_on_the_respaced_chain(eta):
    ours = DDIMSampler(1001, "linear_beta_f64", prediction_type="sample", eta=eta)
    ours.set_timesteps(5)
    monai = DDIMScheduler(5, "respaced_beta", prediction_type="sample", clip_sample=False)
    monai.set_timesteps(5)
    assert ours.alphas_cumprod64[ours.timesteps].tolist() == pytest.approx(
        monai.alphas_cumprod[monai.timesteps].tolist()
    )
    torch.manual_seed(0)
    x_ours = x_monai = torch.randn(SHAPES[1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t_ours, t_monai in zip(ours.timesteps.tolist(), monai.timesteps.tolist(), strict=True):
        x_ours, _ = ours.step(torch.tanh(x_ours), t_ours, x_ours, generator=g1)
        x_monai, _ = monai.step(torch.tanh(x_monai), t_monai, x_monai, eta=eta, generator=g2)
        torch.testing.assert_close(x_ours, x_monai, rtol=1e-5, atol=1e-5)


def test_full_chain_ddpm_equals_monai_epsilon():
    ours = DDPMSampler(50, "linear_beta_f64", variance_type="fixed_small", prediction_type="epsilon")
    monai = DDPMScheduler(50, "linear_beta_f64", variance_type="fixed_small", clip_sample=False)
    monai.set_timesteps(50)
    x_ours = x_monai = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in monai.timesteps.tolist():
        x_ours, _ = ours.step(0.3 * x_ours, t, x_ours, generator=g1)
        x_monai, _ = monai.step(0.3 * x_monai, t, x_monai, generator=g2)
    torch.testing.assert_close(x_ours, x_monai, rtol=1e-4, atol=1e-5)


def test_strided_steps_use_the_next_listed_timestep():
    """T=1000 with 50 steps: every transition uses ᾱ of the next listed t (MONAI 1.6.1 gets 19 of 49 wrong)."""
    s = DDIMSampler(1000, "linear_beta_f64", prediction_type="epsilon")
    s.set_timesteps(50)
    listed = s.timesteps.tolist()
    acp = alphas_cumprod(make_betas("linear_beta_f64", 1000))
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    monai_wrong = 0
    for i, t in enumerate(listed):
        prev = listed[i + 1] if i + 1 < len(listed) else -1
        assert s.previous_timestep(t) == prev
        a_t, a_prev = acp[t].item(), (acp[prev].item() if prev >= 0 else 1.0)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        expected = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        torch.testing.assert_close(s.step(eps, t, x).prev_sample, expected, rtol=1e-6, atol=1e-6)
        monai_wrong += prev >= 0 and t - 1000 // 50 != prev
    assert monai_wrong == 19  # the MONAI pitfall this sampler avoids (methods.md §8)


def test_single_step_is_the_sdseg_x0_estimate():
    s = DDIMSampler(1000, "scaled_linear_beta_f64", prediction_type="epsilon")
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]
    z_t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps_hat = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    acp = s.alphas_cumprod64[999].item()
    expected = (z_t - (1 - acp) ** 0.5 * eps_hat) / acp**0.5
    out = s.step(eps_hat, 999, z_t)
    torch.testing.assert_close(out.prev_sample, expected)
    torch.testing.assert_close(out.pred_original_sample, expected)
    assert 1 / acp**0.5 == pytest.approx(38.7, abs=0.1)
    # DDPM with one step gives the same estimate (no noise after the last step)
    d = DDPMSampler(1000, "scaled_linear_beta_f64", prediction_type="epsilon")
    d.set_timesteps(1)
    torch.testing.assert_close(d.step(eps_hat, 999, z_t).prev_sample, expected)


def test_q_sample_and_latent_estimation_identity():
    s = DDPMSampler(1000, "scaled_linear_beta_f64", prediction_type="epsilon")
    x0 = torch.rand(3, 4, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    acp = s.alphas_cumprod64[t].float().reshape(3, 1, 1, 1)
    torch.testing.assert_close(x_t, acp.sqrt() * x0 + (1 - acp).sqrt() * eps)
    torch.testing.assert_close(s.predict_x0(eps, t, x_t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.predict_epsilon(x0, t, x_t), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sampler", [DDPMSampler, DDIMSampler])
def test_sampling_loop_shapes_2d_3d(shape, sampler, pointwise_denoiser):
    dims = len(shape) - 2
    den = pointwise_denoiser(channels=shape[1], out_channels=shape[1], spatial_dims=dims, timesteps=5)
    s = sampler(5, "respaced_beta", prediction_type="sample")
    s.set_timesteps(5)
    image = torch.rand(shape[0], 1, *shape[2:])
    with torch.no_grad():
        steps = list(sample_progressive(den, den.encode_condition(image), s, torch.randn(shape)))
        x0 = sample(den, den.encode_condition(image), s, torch.randn(shape))
    assert [t for t, _ in steps] == [4, 3, 2, 1, 0]
    assert all(out.prev_sample.shape == shape for _, out in steps)
    assert x0.shape == shape and bool(torch.isfinite(x0).all())


def test_clip_sample_clamps_x0():
    s = DDPMSampler(10, "linear_beta_f64", prediction_type="sample", clip_sample=True)
    out = s.step(torch.full((1, 1, 2, 2), 5.0), 9, torch.zeros(1, 1, 2, 2))
    assert out.pred_original_sample.max().item() == 1.0


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="prediction_type='x'"):
        DDPMSampler(10, prediction_type="x")
    with pytest.raises(ValueError, match="variance_type='learned'"):
        DDPMSampler(10, variance_type="learned")
    with pytest.raises(ValueError, match="eta=-1"):
        DDIMSampler(10, eta=-1)
    s = DDPMSampler(1001)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep 3 is not in the scheduler's timesteps"):
        s.step(torch.zeros(1, 1, 2, 2), 3, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_steps=2000"):
        s.set_timesteps(2000)
