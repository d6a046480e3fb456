"""Losses: hand-computed Dice, absent classes ignored, ε-mode through the recovered x0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffseg.codecs import BinaryCodec, OneHotCodec
from diffseg.ddpm import DDPMSampler
from diffseg.losses import DiffusionSegLoss, ForegroundDiceLoss, cross_entropy_from_probs


def test_foreground_dice_hand_computed_and_absent_class_ignored():
    # 1 sample, 3 classes, 4 voxels; class 2 absent from the ground truth
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.1], [0.2, 0.6, 0.8, 0.3], [0.1, 0.2, 0.1, 0.6]]).reshape(1, 3, 4)
    gt = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32).reshape(1, 3, 4)
    # class 1: 2·(0.6+0.8) / (0.2+0.6+0.8+0.3 + 2) = 2.8 / 3.9
    expected = 1 - 2.8 / 3.9
    assert ForegroundDiceLoss()(probs, gt).item() == pytest.approx(expected, abs=1e-6)


def test_foreground_dice_zero_when_no_foreground_anywhere():
    probs = torch.softmax(torch.randn(2, 3, 4, 4, requires_grad=True), 1)
    gt = torch.zeros(2, 3, 4, 4)
    gt[:, 0] = 1
    loss = ForegroundDiceLoss()(probs, gt)
    assert loss.item() == 0.0 and loss.requires_grad


def test_ce_from_probs_equals_torch_ce():
    logits = torch.randn(2, 4, 5, 5)
    label = torch.randint(0, 4, (2, 1, 5, 5))
    onehot = OneHotCodec(4).onehot(label)
    expected = F.cross_entropy(logits, label[:, 0])
    assert cross_entropy_from_probs(torch.softmax(logits, 1), onehot).item() == pytest.approx(expected.item(), rel=1e-5)


def _target(codec, scheduler, label, t):
    x0 = codec.encode(label)
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    return {"label": codec.onehot(label), "x0": x0, "noise": noise, "x_t": x_t, "timesteps": t}


def test_x0_logits_loss_is_dice_plus_ce():
    codec = OneHotCodec(3)
    label = torch.randint(0, 3, (2, 1, 6, 6))
    logits = torch.randn(2, 3, 6, 6)
    target = {"label": codec.onehot(label)}
    loss = DiffusionSegLoss(codec)(logits, target)
    probs = torch.softmax(logits, 1)
    expected = ForegroundDiceLoss()(probs, target["label"]) + F.cross_entropy(logits, label[:, 0])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_epsilon_mode_uses_recovered_x0_and_mse():
    codec = OneHotCodec(3)
    sched = DDPMSampler(5, "respaced_beta", prediction_type="epsilon")
    label = torch.randint(0, 3, (2, 1, 6, 6))
    t = torch.tensor([1, 3])
    target = _target(codec, sched, label, t)
    loss_fn = DiffusionSegLoss(codec, sched, logits_output=False, mse_weight=0.1)
    # the true ε recovers x0 exactly: Dice ≈ 0, CE ≈ 0, MSE = 0
    assert loss_fn(target["noise"], target).item() == pytest.approx(0.0, abs=1e-4)
    eps_hat = target["noise"] + 0.5
    expected_mse = 0.1 * 0.25
    probs = codec.decode(sched.predict_x0(eps_hat, t, target["x_t"]))
    expected = (
        ForegroundDiceLoss()(probs, target["label"]) + cross_entropy_from_probs(probs, target["label"]) + expected_mse
    )
    assert loss_fn(eps_hat, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_segdiff_sum_reduction():
    codec = BinaryCodec(1)
    sched = DDPMSampler(100, "improved_linear_beta")
    target = _target(codec, sched, torch.randint(0, 2, (2, 1, 8, 8)), torch.tensor([0, 50]))
    loss_fn = DiffusionSegLoss(codec, sched, False, dice_weight=0, ce_weight=0, mse_weight=1, mse_reduction="sum")
    assert loss_fn(target["noise"] + 1.0, target).item() == pytest.approx(64.0)  # 8·8 per sample


def test_loss_config_errors():
    with pytest.raises(ValueError, match="scheduler is required"):
        DiffusionSegLoss(OneHotCodec(2), logits_output=False)
    with pytest.raises(ValueError, match="mse_reduction='max'"):
        DiffusionSegLoss(OneHotCodec(2), DDPMSampler(5), False, mse_reduction="max")
    with pytest.raises(ValueError, match="x0_snr_gamma=1.0 needs"):
        DiffusionSegLoss(OneHotCodec(2), DDPMSampler(5), True, x0_snr_gamma=1.0)
    with pytest.raises(ValueError, match="x0_snr_gamma=0 needs"):
        DiffusionSegLoss(OneHotCodec(2), DDPMSampler(5), False, x0_snr_gamma=0)


def test_min_snr_gamma_scales_each_samples_x0_terms_by_min_snr_over_gamma():
    """Two samples at t = 10 (SNR > γ: factor 1) and t = 80 (SNR ≪ γ: factor SNR/γ); the MSE term is untouched."""
    codec = BinaryCodec(1)
    sched = DDPMSampler(100, "improved_linear_beta")
    label = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    label[..., 2:6, 2:6] = 1
    t = torch.tensor([10, 80])
    target = _target(codec, sched, label, t)
    eps_hat = target["noise"] + 0.3 * torch.randn_like(target["noise"])
    acp = sched.alphas_cumprod64[t]
    snr = acp / (1 - acp)
    assert float(snr[0]) > 1 > 1e-2 > float(snr[1])
    factors = DiffusionSegLoss(codec, sched, False, x0_snr_gamma=1.0).snr_weights(t)
    torch.testing.assert_close(factors, torch.stack([torch.tensor(1.0, dtype=acp.dtype), snr[1]]))
    weighted = DiffusionSegLoss(codec, sched, False, mse_weight=0.5, x0_snr_gamma=1.0)
    plain = DiffusionSegLoss(codec, sched, False, mse_weight=0.5)
    for i in range(2):  # one sample at a time: weighted = factor · (Dice + CE) + MSE
        one = {k: v[i : i + 1] for k, v in target.items()}
        plain(eps_hat[i : i + 1], one)
        expected = (
            float(factors[i]) * (plain.last_terms["dice"] + plain.last_terms["ce"]) + 0.5 * plain.last_terms["mse"]
        )
        assert weighted(eps_hat[i : i + 1], one).item() == pytest.approx(expected, rel=1e-5)
