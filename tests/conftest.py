"""Shared test fixtures: tiny denoisers that run in milliseconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from diffseg.denoiser import ConditionalDenoiser


class PointwiseDenoiser(ConditionalDenoiser):
    """A per-voxel (1×1 conv) denoiser with a learned per-timestep bias: output(v) depends only on voxel v.

    ``encode_calls`` counts image encodings, so tests can check conditioning is computed once per image.
    """

    def __init__(self, image_channels: int, channels: int, out_channels: int, spatial_dims: int, timesteps: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.encoder = conv(image_channels, 4, 1)
        self.head = conv(4 + channels, out_channels, 1)
        self.time = nn.Embedding(timesteps, out_channels)
        self.encode_calls = 0

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return torch.tanh(self.encoder(image))

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.cat([features, x_t], dim=1))
        bias = self.time(timesteps)
        return out + bias.reshape(*bias.shape, *([1] * (x_t.ndim - 2)))


@pytest.fixture
def pointwise_denoiser():
    """Factory: ``pointwise_denoiser(image_channels, channels, out_channels, spatial_dims, timesteps, seed=0)``."""

    def make(image_channels=1, channels=3, out_channels=3, spatial_dims=2, timesteps=5, seed=0):
        torch.manual_seed(seed)
        return PointwiseDenoiser(image_channels, channels, out_channels, spatial_dims, timesteps)

    return make


@pytest.fixture
def spy_denoise():
    """``spy_denoise(segmenter) -> calls``: every later ``segmenter.denoiser.denoise`` call appends its x_t."""

    def attach(segmenter) -> list:
        calls = []
        original = segmenter.denoiser.denoise

        def spy(x_t, t, features):
            calls.append(x_t)
            return original(x_t, t, features)

        segmenter.denoiser.denoise = spy
        return calls

    return attach
