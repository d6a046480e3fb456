"""Recycling (paper 000): the first pass carries no gradient; the trained pass sees the recycled prediction."""

from __future__ import annotations

import pytest
import torch

from diffseg.codecs import OneHotCodec
from diffseg.ddpm import DDPMSampler
from diffseg.losses import DiffusionSegLoss
from diffseg.recycling import recycled_x0, recycling_timesteps
from diffseg.training import DiffusionSegPrepareBatch


def test_recycling_timesteps():
    t = torch.tensor([0, 1, 3, 4])
    assert recycling_timesteps(t, 5).tolist() == [1, 2, 4, 4]
    assert recycling_timesteps(t, 5, "max").tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="mode='prev'"):
        recycling_timesteps(t, 5, "prev")


def test_first_pass_has_no_gradient_and_uses_t_prime(pointwise_denoiser):
    den = pointwise_denoiser()
    seen = []
    den.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), out.requires_grad)))
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    codec = OneHotCodec(3)
    x0 = codec.encode(torch.randint(0, 3, (2, 1, 8, 8)))
    out = recycled_x0(den, torch.rand(2, 1, 8, 8), x0, torch.tensor([0, 4]), sched, codec)
    assert len(seen) == 1
    t_seen, grad_flag = seen[0]
    assert t_seen.tolist() == [1, 4] and grad_flag is False
    assert not out.requires_grad and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out.sum(1), torch.full((2, 8, 8), -1.0))  # softmax·2-1 over 3 classes sums to -1


def _batch():
    torch.manual_seed(0)
    return {"image": torch.rand(2, 1, 8, 8), "label": torch.randint(0, 3, (2, 1, 8, 8))}


def test_recycling_step_gradient_comes_only_from_the_second_pass(pointwise_denoiser):
    """Spy on every parameter: the gradient equals that of the second pass alone on the same (detached) x_t."""
    den = pointwise_denoiser()
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    codec = OneHotCodec(3)
    loss_fn = DiffusionSegLoss(codec)
    prep = DiffusionSegPrepareBatch(sched, codec, network=den, recycling=True)
    calls = {"n": 0}
    hooks = [p.register_hook(lambda g: calls.__setitem__("n", calls["n"] + 1)) for p in den.parameters()]
    torch.manual_seed(1)
    x_t, target, _, kw = prep(_batch())
    assert not x_t.requires_grad  # built from the stop-gradient prediction
    loss = loss_fn(den(x_t, **kw), target)
    loss.backward()
    assert calls["n"] == len(list(den.parameters()))  # one gradient per parameter: a single differentiable pass
    grads = [p.grad.clone() for p in den.parameters()]
    for h in hooks:
        h.remove()
    den.zero_grad()
    loss_fn(den(x_t.detach().clone(), **kw), target).backward()
    for g, p in zip(grads, den.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_recycled_input_differs_from_plain_input(pointwise_denoiser):
    den = pointwise_denoiser()
    sched = DDPMSampler(5, "respaced_beta", prediction_type="sample")
    codec = OneHotCodec(3)
    plain = DiffusionSegPrepareBatch(sched, codec)
    recyc = DiffusionSegPrepareBatch(sched, codec, network=den, recycling=True)
    torch.manual_seed(2)
    x_plain, target, _, kw = plain(_batch())
    # plain: x_t is the ground truth noised with the returned noise
    torch.testing.assert_close(x_plain, sched.add_noise(target["x0"], target["noise"], kw["timesteps"]))
    torch.manual_seed(2)
    x_rec, target_rec, _, _ = recyc(_batch())
    assert not torch.allclose(x_rec, sched.add_noise(target_rec["x0"], target_rec["noise"], target_rec["timesteps"]))


def test_recycling_needs_the_network():
    with pytest.raises(ValueError, match="recycling=True needs the network"):
        DiffusionSegPrepareBatch(DDPMSampler(5), OneHotCodec(2), recycling=True)
