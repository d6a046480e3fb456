"""Paper-001 analyses: one-call x̂0 error curves, segmentation scores and the PNG/CSV writers."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from diffseg import BinaryCodec, DDPMSampler, DiffusionSegmenter, OneHotCodec
from diffseg.analysis import (
    mask_error_curve,
    save_curve_plot,
    save_reliability_diagram,
    segmentation_scores,
    write_csv,
)
from diffseg.denoiser import ConditionalDenoiser
from diffseg.metrics import reliability_data


class Oracle(ConditionalDenoiser):
    """Predicts x0 from the image, which IS the encoded mask: a perfect x0-predictor while conditioned on it."""

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return features


class Identity(ConditionalDenoiser):
    """Predicts x0 = x_t: ignores the image."""

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return x_t


def pairs(codec, n=2):
    out = []
    for i in range(n):
        label = torch.zeros(1, 1, 12, 12, dtype=torch.long)
        label[..., 2 + i : 8 + i, 3:9] = 1
        out.append((codec.encode(label).float(), label))
    return out


def segmenter(denoiser, codec, t=50):
    return DiffusionSegmenter(denoiser, DDPMSampler(t, "linear_beta_f64", prediction_type="sample"), codec)


def test_a_perfect_conditioned_predictor_has_zero_error_at_every_t_and_loses_it_unconditioned():
    codec = BinaryCodec(1)
    seg = segmenter(Oracle(), codec)
    rows = mask_error_curve(seg, pairs(codec), timesteps=[0, 25, 49], draws=2)
    assert [r["t"] for r in rows] == [0, 25, 49]
    assert all(r["mse"] == pytest.approx(0.0, abs=1e-12) and r["dice"] == pytest.approx(1.0) for r in rows)
    blind = mask_error_curve(seg, pairs(codec), timesteps=[0, 25, 49], draws=2, unconditioned=True)
    assert all(r["mse"] > 0.3 and r["dice"] < 0.9 for r in blind)


class ImageOnlyEpsilon(ConditionalDenoiser):
    """An ε-predictor that ignores x_t (the collapse of SegDiff 0.3.x): ε̂ = −image/2."""

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return -features / 2


def test_the_noise_slope_tells_a_denoiser_that_reads_x_t_from_one_that_ignores_it():
    codec = BinaryCodec(1)
    reads = mask_error_curve(segmenter(Oracle(), codec), pairs(codec), [10, 30, 49], draws=2)
    assert all(r["noise_slope"] == pytest.approx(1.0, abs=1e-4) for r in reads)  # x0-prediction: ε̂ = ε exactly
    blind = DiffusionSegmenter(ImageOnlyEpsilon(), DDPMSampler(50, "linear_beta_f64"), codec)
    rows = mask_error_curve(blind, pairs(codec), [10, 30, 49], draws=8)
    assert all(abs(r["noise_slope"]) < 0.1 for r in rows)
    assert rows[-1]["dice"] < rows[0]["dice"]  # its x̂0 is swamped by √(1−ᾱ)/√ᾱ·ε at large t


def test_an_image_blind_x_t_copier_degrades_with_t():
    codec = OneHotCodec(3)
    label = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    label[..., 2:8, 2:8], label[..., 9:14, 9:14] = 1, 2
    rows = mask_error_curve(segmenter(Identity(), codec), [(torch.zeros(1, 1, 16, 16), label)], [0, 10, 49], draws=3)
    assert rows[0]["dice"] == pytest.approx(1.0) and rows[0]["mse"] < 1e-3  # ᾱ_0 ≈ 1: x_t ≈ x0
    assert rows[0]["mse"] < rows[1]["mse"] < rows[2]["mse"] and rows[2]["dice"] < rows[0]["dice"]


def test_the_curve_is_reproducible_for_a_seed_and_needs_data():
    codec = BinaryCodec(1)
    seg = segmenter(Identity(), codec)
    a = mask_error_curve(seg, pairs(codec), [10, 30], seed=3)
    assert a == mask_error_curve(seg, pairs(codec), [10, 30], seed=3)
    assert a != mask_error_curve(seg, pairs(codec), [10, 30], seed=4)
    with pytest.raises(ValueError, match="no \\(image, label\\) pairs"):
        mask_error_curve(seg, [], [10])


def test_segmentation_scores_dice_iou_and_ece():
    label = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    label[..., :5, :] = 1  # half foreground
    p = label.float()
    perfect = torch.cat([1 - p, p], 1)
    assert segmentation_scores(perfect, label) == {"dice": 1.0, "iou": 1.0, "ece": 0.0}
    half = torch.full_like(perfect, 0.5)  # all background by argmax, perfectly calibrated at p = 0.5
    scores = segmentation_scores(torch.cat([half[:, :1] + 0.01, half[:, 1:] - 0.01], 1), label)
    assert scores["dice"] == 0.0 and scores["ece"] == pytest.approx(0.01, abs=1e-6)


def test_csv_and_png_writers(tmp_path):
    rows = [{"t": 0, "mse": 0.0, "dice": 1.0}, {"t": 10, "mse": 0.5, "dice": 0.4}]
    path = write_csv(rows, tmp_path / "curve.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["t"] for r in read] == ["0", "10"] and list(read[0]) == ["t", "mse", "dice"]
    png = save_curve_plot({"conditioned": rows, "unconditioned": rows}, tmp_path / "curve.png", "test")
    label = torch.randint(0, 2, (1, 1, 8, 8))
    probs = torch.rand(1, 1, 8, 8)
    diagram = save_reliability_diagram(reliability_data(torch.cat([1 - probs, probs], 1), label), tmp_path / "r.png")
    for file in (png, diagram):
        with Image.open(file) as img:
            assert img.format == "PNG" and img.size[0] > 200
