"""Metrics: Dice/IoU/HD95 through MONAI, ECE on a hand-computed example, seed stability."""

from __future__ import annotations

import math

import pytest
import torch

from diffseg.metrics import (
    classwise_calibration_error,
    dice_per_class,
    expected_calibration_error,
    hd95_per_class,
    iou_per_class,
    reliability_data,
    seed_stability,
)


def _binary(p):
    p = torch.tensor(p).reshape(1, 1, -1)
    return torch.cat([1 - p, p], 1)


def test_ece_hand_computed_foreground():
    probs = _binary([0.05, 0.15, 0.95, 0.85, 0.55, 0.45])
    gt = torch.tensor([0, 1, 1, 0, 1, 0]).reshape(1, 1, 6)
    # one voxel per bin: |0.05-0| + |0.15-1| + |0.95-1| + |0.85-0| + |0.55-1| + |0.45-0| = 2.7, over 6 voxels
    assert expected_calibration_error(probs, gt).item() == pytest.approx(0.45, abs=1e-6)


def test_ece_confidence_mode_and_bin_edges():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 1.0 (right): bins (0.8,0.9] acc .5 conf .9, (0.5,0.6] acc 1,
    # (0.9,1] acc 1 conf 1 → ECE = (2·0.4 + 0.4 + 0) / 4 = 0.3; 0.9 falls in (0.8, 0.9] because bins are right-closed
    probs = _binary([0.9, 0.1, 0.6, 1.0])
    gt = torch.tensor([1, 1, 1, 1]).reshape(1, 1, 4)
    assert expected_calibration_error(probs, gt, mode="confidence").item() == pytest.approx(0.3, abs=1e-6)
    data = reliability_data(probs, gt, mode="confidence")
    assert data.counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 2, 1]
    assert data.ece == pytest.approx(0.3, abs=1e-6)
    assert math.isnan(data.accuracy[0].item()) and data.accuracy[8].item() == pytest.approx(0.5)


def test_perfect_calibration_is_zero():
    probs = _binary([0.0, 1.0, 1.0, 0.0])
    gt = torch.tensor([0, 1, 1, 0]).reshape(1, 1, 4)
    assert expected_calibration_error(probs, gt).item() == pytest.approx(0.0)


def test_classwise_ece_per_foreground_class():
    # 3 classes, 2 voxels; class 1: p = (0.8, 0.3) vs y = (1, 0) → (0.2 + 0.3)/2; class 2: p = (0.1, 0.6) vs (0, 1)
    probs = torch.tensor([[0.1, 0.1], [0.8, 0.3], [0.1, 0.6]]).reshape(1, 3, 2)
    gt = torch.tensor([1, 2]).reshape(1, 1, 2)
    ece = classwise_calibration_error(probs, gt)
    assert ece.shape == (1, 2)
    assert ece[0].tolist() == pytest.approx([0.25, 0.25], abs=1e-6)


def test_ece_needs_binary_probs():
    with pytest.raises(ValueError, match=r"binary probabilities \(B, 2, \*S\)"):
        expected_calibration_error(torch.rand(1, 3, 4), torch.zeros(1, 1, 4))


def test_dice_iou_hd95_per_class():
    gt = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    gt[0, 0, 2:6, 2:6] = 1  # 16 px
    pred = torch.zeros_like(gt)
    pred[0, 0, 2:6, 2:8] = 1  # 24 px, 16 overlap
    pred[0, 0, 0, 0] = 2  # class 2 absent from gt → NaN
    dice = dice_per_class(pred, gt, 3)
    assert dice[0, 0].item() == pytest.approx(2 * 16 / 40) and math.isnan(dice[0, 1].item())
    assert iou_per_class(pred, gt, 3)[0, 0].item() == pytest.approx(16 / 24)
    assert hd95_per_class(pred, gt, 3)[0, 0].item() == pytest.approx(2.0)
    assert hd95_per_class(pred, gt, 3, spacing=(0.5, 0.5))[0, 0].item() == pytest.approx(1.0)


def test_seed_stability_identical_and_different_runs():
    torch.manual_seed(0)
    fg = torch.rand(1, 1, 16, 16)
    a = torch.cat([1 - fg, fg], 1)
    same = seed_stability([a, a.clone(), a.clone()])
    assert same.pairs == 3 and same.dice == pytest.approx(1.0) and same.ssim == pytest.approx(1.0, abs=1e-5)
    assert math.isinf(same.psnr)
    fg2 = (fg + 0.1 * torch.randn_like(fg)).clamp(0, 1)
    other = seed_stability([a, torch.cat([1 - fg2, fg2], 1)])
    assert other.dice < 1.0 and 15 < other.psnr < 30 and other.ssim < 1.0
    with pytest.raises(ValueError, match="at least 2 runs"):
        seed_stability([a])
