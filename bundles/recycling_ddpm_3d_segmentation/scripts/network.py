"""ImgX-DiffSeg v0.1.0 ``Unet3dTime`` (paper 000, methods.md §1.4) from MONAI blocks.

Encoder: conv 3³ → c0 + instance norm + GELU and a time residual block, then per level a stride-2 kernel-2 conv
(+ instance norm) and a time residual block. Decoder: transposed conv ×2, crop, **additive** skip, time residual
block. Head: 1×1 conv to the class logits. Time: the integer step index through a sinusoidal embedding of
``4·channels[0]`` dims (no MLP). No attention, no dropout. Input = ``[image, x_t]`` (see ``diffseg.ConcatDenoiser``).

It is several times cheaper than MONAI's ``DiffusionModelUNet`` at the same channels (additive skips, one residual
block per level, no full-resolution concatenations); the model card gives the measured comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = ["TimeResBlock", "UNetTime"]

_NORM = ("instance", {"affine": True})


class TimeResBlock(nn.Module):
    """``GELU(x + IN(conv(GELU(IN(conv(x)))) + Linear(GELU(temb))))`` with bias-free 3³ convs; in = out channels."""

    def __init__(self, spatial_dims: int, channels: int, temb_dim: int) -> None:
        super().__init__()
        self.conv1 = Convolution(spatial_dims, channels, channels, kernel_size=3, bias=False, norm=_NORM, act="GELU")
        self.conv2 = Convolution(spatial_dims, channels, channels, kernel_size=3, bias=False, conv_only=True)
        self.time_proj = nn.Linear(temb_dim, channels)
        self.norm = get_norm_layer(_NORM, spatial_dims, channels)
        self.act = nn.GELU()
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S), temb (B, temb_dim) → (B, C, *S)."""
        h = self.conv2(self.conv1(x))
        h = h + self.time_proj(self.act(temb)).reshape(*temb.shape[:1], -1, *([1] * self.spatial_dims))
        return self.act(x + self.norm(h))


class UNetTime(nn.Module):
    """Time-conditioned U-Net with additive skips (ImgX-DiffSeg v0.1.0).

    Args:
        spatial_dims: 3 (2 works for tests).
        in_channels: image channels + mask channels (``[image, x_t]``).
        out_channels: class logits C.
        channels: per-level widths; the paper uses (32, 64, 128, 256). Level 0 runs at full resolution.
        max_period: sinusoidal embedding period.

    ``forward(x (B, in, *S), timesteps (B,) long) -> (B, out, *S)``; each spatial size must be divisible by
    ``2 ** len(channels)`` (sliding-window inference with such a ``roi_size`` pads smaller images).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        max_period: int = 10000,
    ) -> None:
        super().__init__()
        channels = list(channels)
        self.temb_dim = 4 * channels[0]
        self.max_period = max_period
        c0 = channels[0]
        self.stem = Convolution(spatial_dims, in_channels, c0, kernel_size=3, bias=False, norm=_NORM, act="GELU")
        self.stem_block = TimeResBlock(spatial_dims, c0, self.temb_dim)
        widths = [c0, *channels]  # inputs of each down level
        self.down = nn.ModuleList(
            Convolution(spatial_dims, cin, cout, strides=2, kernel_size=2, padding=0, bias=False, norm=_NORM, act=None)
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.down_blocks = nn.ModuleList(TimeResBlock(spatial_dims, c, self.temb_dim) for c in channels)
        up_out = widths[-2::-1]  # e.g. 128, 64, 32, 32
        up_in = widths[:0:-1]  # e.g. 256, 128, 64, 32
        self.up = nn.ModuleList(
            Convolution(
                spatial_dims, cin, cout, strides=2, kernel_size=2, padding=0, output_padding=0,
                is_transposed=True, conv_only=True,
            )
            for cin, cout in zip(up_in, up_out, strict=True)
        )  # fmt: skip
        self.up_blocks = nn.ModuleList(TimeResBlock(spatial_dims, c, self.temb_dim) for c in up_out)
        self.head = Convolution(spatial_dims, c0, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        factor = 2 ** len(self.down)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial shape {tuple(x.shape[2:])} must be divisible by {factor} (2 ** levels)")
        temb = get_timestep_embedding(timesteps.reshape(-1), self.temb_dim, self.max_period).to(x.dtype)
        h = self.stem_block(self.stem(x), temb)
        skips = [h]
        for down, block in zip(self.down, self.down_blocks, strict=True):
            h = block(down(h), temb)
            skips.append(h)
        skips.pop()  # the bottom feature map is h itself
        for up, block in zip(self.up, self.up_blocks, strict=True):
            skip = skips.pop()
            h = block(up(h) + skip, temb)
        return self.head(h)
