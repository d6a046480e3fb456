"""The denoiser interface shared by samplers, training and the segmenter.

A denoiser is called as ``denoiser(x_t, timesteps, image)`` during training. For sampling, the image conditioning is
computed once per image with ``encode_condition(image)`` and reused for every step and every ensemble member through
``denoise(x_t, timesteps, features)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["ConcatDenoiser", "ConditionalDenoiser"]


class ConditionalDenoiser(nn.Module):
    """Base class: override ``denoise`` and, when the image passes through an encoder, ``encode_condition``."""

    def encode_condition(self, image: torch.Tensor) -> Any:
        """Image (B, C_img, *S) → conditioning features (tensor or nested tuple/list/dict of tensors, batch first)."""
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: Any) -> torch.Tensor:
        """x_t (B, C, *S_x), timesteps (B,) long, features from ``encode_condition`` → output (B, C_out, *S_x)."""
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, timesteps, self.encode_condition(image))


class ConcatDenoiser(ConditionalDenoiser):
    """Conditions a time-conditioned network ``net(x, timesteps)`` by channel concatenation of image and x_t.

    Args:
        net: e.g. MONAI ``DiffusionModelUNet`` or a bundle's U-Net, with ``in_channels = C_img + C``.
        image_first: ``[image, x_t]`` (ImgX-DiffSeg) if True, else ``[x_t, image]`` (MONAI ``DiffusionInferer``
            ``mode="concat"``, SDSeg latents). Record the order in the bundle's metadata.
    """

    def __init__(self, net: nn.Module, image_first: bool = True) -> None:
        super().__init__()
        self.net = net
        self.image_first = image_first

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        parts = (features, x_t) if self.image_first else (x_t, features)
        return self.net(torch.cat(parts, dim=1), timesteps)
