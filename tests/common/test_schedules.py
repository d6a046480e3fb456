"""Noise schedules: values from the authors' code (shared/reference/methods.md)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from diffseg.schedules import NoiseSchedules, alphas_cumprod, make_betas

ALL = ["linear_beta_f64", "improved_linear_beta", "scaled_linear_beta_f64", "cosine_clipped_beta", "respaced_beta"]


@pytest.mark.parametrize("name", ALL)
def test_registered_in_monai_and_valid(name):
    assert name in NoiseSchedules.names
    t = 5 if name == "respaced_beta" else 50
    betas = make_betas(name, t)
    assert betas.shape == (t,) and betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas < 1)).all())
    acp = alphas_cumprod(betas)
    assert bool((acp[1:] < acp[:-1]).all()), "ᾱ must decrease strictly"


def test_ddpm_linear_endpoints():
    betas = make_betas("linear_beta_f64", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_segdiff_improved_linear_t100():
    betas = make_betas("improved_linear_beta", 100)
    assert betas[0].item() == pytest.approx(0.001, rel=1e-12)
    assert betas[99].item() == pytest.approx(0.2, rel=1e-12)
    assert alphas_cumprod(betas)[99].item() == pytest.approx(2.0e-5, rel=0.03)


def test_sdseg_scaled_linear():
    acp = alphas_cumprod(make_betas("scaled_linear_beta_f64", 1000))
    assert acp[0].item() == pytest.approx(0.9985, abs=1e-6)
    assert acp[999].item() == pytest.approx(6.69e-4, rel=1e-3)
    assert acp[999].sqrt().item() == pytest.approx(0.0259, abs=1e-4)


def test_cosine_t300_noise_levels():
    acp = alphas_cumprod(make_betas("cosine_clipped_beta", 300))
    std = (1 - acp[[10, 30, 60]]).sqrt()
    scale = acp[[10, 30, 60]].sqrt()
    assert std.tolist() == pytest.approx([0.068, 0.172, 0.323], abs=1e-3)
    assert scale.tolist() == pytest.approx([0.998, 0.985, 0.946], abs=1e-3)
    betas = make_betas("cosine_clipped_beta", 300)
    assert betas.min().item() >= 1e-4 and betas.max().item() <= 0.9999


def test_imgx_respaced_five_steps():
    acp = alphas_cumprod(make_betas("respaced_beta", 5))
    assert acp.tolist() == pytest.approx([0.9999, 0.52175, 0.077992, 0.0033189, 3.995e-5], rel=2e-4)
    betas = make_betas("respaced_beta", 5)
    assert betas.tolist() == pytest.approx([1e-4, 0.47820, 0.85052, 0.95745, 0.98796], abs=1e-5)


def test_monai_scheduler_accepts_diffseg_schedule():
    sched = DDPMScheduler(num_train_timesteps=100, schedule="improved_linear_beta")
    assert sched.betas[0].item() == pytest.approx(0.001)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="schedule='nope'.*linear_beta"):
        make_betas("nope", 10)
