"""Uncertainty maps and per-image scores."""

from __future__ import annotations

import math

import pytest
import torch

from diffseg.uncertainty import image_score, predictive_entropy, sample_std, uncertainty


def test_std_across_samples():
    samples = torch.tensor([0.2, 0.6]).reshape(1, 2, 1, 1)  # B=1, N=2, C=1, one voxel
    assert sample_std(samples).item() == pytest.approx(0.2)


def test_entropy_uniform_and_certain():
    uniform = torch.full((1, 4, 2), 0.25)
    assert predictive_entropy(uniform).flatten().tolist() == pytest.approx([math.log(4)] * 2)
    certain = torch.tensor([1.0, 0.0]).reshape(1, 2, 1)
    assert predictive_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)


def test_image_score_ranks_the_more_uncertain_image_first():
    calm = torch.tensor([[0.9, 0.1]] * 3).reshape(1, 3, 2, 1)
    torn = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]).reshape(1, 3, 2, 1)
    maps = uncertainty(torch.cat([calm, torn]))
    assert image_score(maps, "std").argmax().item() == 1
    assert image_score(maps, "entropy").argmax().item() == 1
    assert image_score(maps, "std")[0].item() == 0.0
    with pytest.raises(ValueError, match="measure='mi'"):
        image_score(maps, "mi")


def test_std_equals_torch_std_and_is_exactly_zero_where_samples_agree():
    samples = torch.rand(2, 5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample_std(samples), samples.std(dim=1, correction=0), atol=1e-6, rtol=0)
    same = torch.rand(1, 1, 3, 8).expand(1, 4, 3, 8)
    assert sample_std(same).abs().max().item() == 0.0 and sample_std(samples[:, :1]).abs().max().item() == 0.0
