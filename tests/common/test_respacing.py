"""ᾱ-subsampling (ImgX-DiffSeg v0.1.0 semantics)."""

from __future__ import annotations

import pytest
import torch

from diffseg.respacing import respace, spaced_timesteps
from diffseg.schedules import alphas_cumprod, make_betas


def test_imgx_indices():
    assert spaced_timesteps(1001, 5).tolist() == [0, 250, 500, 750, 1000]


@pytest.mark.parametrize(("t", "k"), [(1001, 1001), (101, 101), (21, 5), (101, 5), (11, 3), (1000, 50), (1000, 7)])
def test_first_and_last_kept_and_cumprod_preserved(t, k):
    base = make_betas("linear_beta_f64", t)
    idx = spaced_timesteps(t, k)
    assert idx.shape == (k,) and idx[0] == 0 and idx[-1] == t - 1
    assert bool((idx[1:] > idx[:-1]).all())
    new = respace(base, idx)
    assert torch.allclose(alphas_cumprod(new), alphas_cumprod(base)[idx], rtol=1e-12)


def test_round_half_even_collision_avoided():
    # linspace(0, 5, 3) = [0, 2.5, 5]: floor(x + 0.5) keeps 3 where round-half-even would give 2
    idx = spaced_timesteps(6, 3)
    assert idx.tolist() == [0, 3, 5]
    assert len(set(spaced_timesteps(1000, 667).tolist())) == 667


def test_single_step_keeps_last():
    assert spaced_timesteps(1000, 1).tolist() == [999]


def test_respace_first_beta_is_base_first_beta():
    base = make_betas("linear_beta_f64", 1001)
    assert respace(base, spaced_timesteps(1001, 5))[0].item() == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("k", [0, 12])
def test_bad_step_count(k):
    with pytest.raises(ValueError, match=f"num_steps={k} must be between 1 and num_train_timesteps=11"):
        spaced_timesteps(11, k)


def test_bad_indices():
    base = make_betas("linear_beta_f64", 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        respace(base, [0, 5, 5])
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        respace(base, [0, 10])
