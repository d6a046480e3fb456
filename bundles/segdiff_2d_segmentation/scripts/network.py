"""SegDiff's denoiser ε_θ(x_t, I, t) = D(E(F(x_t) + G(I), t), t) (Amit et al. 2021; methods.md §2.2–2.3).

- **G** (:class:`RRDBEncoder`): the ESRGAN RRDB network at full resolution, no normalisation: conv-first →
  ``features``, ``num_blocks`` RRDBs of 3 residual dense blocks (5 convs, growth ``growth``, LeakyReLU 0.2, output
  scaled by 0.2 and added), trunk conv added to the conv-first features, HR conv → LeakyReLU → conv-last to the U-Net's
  base channels.
- **F**: the U-Net's own ``conv_in`` (one 3×3 conv, mask channels → base channels) applied to x_t.
- **E/D**: MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` (sinusoidal → MLP time embedding, residual blocks,
  attention where configured); :class:`SegDiffUNet` only adds G(I) to F(x_t), so the sum is the first feature map
  and the first skip.

:class:`SegDiffDenoiser` is a :class:`diffseg.ConditionalDenoiser`: ``encode_condition(image) = G(image)`` runs once
per image and is reused for every step and every ensemble member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from diffseg.denoiser import ConditionalDenoiser
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = ["RRDB", "RRDBEncoder", "ResidualDenseBlock", "SegDiffDenoiser", "SegDiffUNet", "UncachedDenoiser"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


class ResidualDenseBlock(nn.Module):
    """ESRGAN ``ResidualDenseBlock_5C``: 5 densely connected 3×3 convs; ``x + scale·conv5(...)``; (B, C, *S) → same."""

    def __init__(self, spatial_dims: int, features: int, growth: int, scale: float = 0.2) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.convs = nn.ModuleList(
            conv(features + i * growth, growth if i < 4 else features, 3, padding=1) for i in range(5)
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(self.act(conv(torch.cat(feats, dim=1))))
        return x + self.scale * self.convs[-1](torch.cat(feats, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: 3 dense blocks, ``x + scale·blocks(x)``; (B, C, *S) → same."""

    def __init__(self, spatial_dims: int, features: int, growth: int, scale: float = 0.2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(spatial_dims, features, growth, scale) for _ in range(3)))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.blocks(x)


class RRDBEncoder(nn.Module):
    """SegDiff's image encoder G (``RRDBNet`` of the authors' code): image (B, C_img, *S) → (B, out_channels, *S).

    Args:
        spatial_dims: 2 (3 works for slice-free 3D experiments).
        in_channels: image channels (3 for RGB, 1 for grey).
        out_channels: the U-Net's base channels (``channels[0]``).
        features: ``nf`` (paper 64).
        growth: ``gc`` (paper 32).
        num_blocks: ``nb`` RRDB blocks (paper 12 for MoNuSeg).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: int = 64,
        growth: int = 32,
        num_blocks: int = 12,
    ) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.conv_first = conv(in_channels, features, 3, padding=1)
        self.trunk = nn.Sequential(*(RRDB(spatial_dims, features, growth) for _ in range(num_blocks)))
        self.trunk_conv = conv(features, features, 3, padding=1)
        self.hr_conv = conv(features, features, 3, padding=1)
        self.conv_last = conv(features, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(image)
        fea = fea + self.trunk_conv(self.trunk(fea))
        return self.conv_last(self.act(self.hr_conv(fea)))


class SegDiffUNet(DiffusionModelUNet):
    """MONAI's diffusion U-Net whose first feature map is ``conv_in(x_t) + condition`` (E and D of SegDiff).

    Same arguments as :class:`~monai.networks.nets.DiffusionModelUNet` (``in_channels`` = mask channels, 1 for
    SegDiff). ``forward(x (B, C, *S), timesteps (B,), condition (B, channels[0], *S)) -> (B, out_channels, *S)``.
    Each spatial size must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        h = self.conv_in(x)  # F(x_t)
        if condition is not None:
            h = h + condition  # F(x_t) + G(I): the first feature map and the first skip
        skips = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None)
            skips = skips[:-n]
        return self.out(h)


class SegDiffDenoiser(ConditionalDenoiser):
    """ε_θ(x_t, I, t) = D(E(F(x_t) + G(I), t), t).

    Args:
        spatial_dims: 2.
        image_channels: channels of I (1 grey, 3 RGB).
        mask_channels: channels of x_t (1: binary SegDiff) and of the output (ε̂, or logits in feed-forward mode).
        channels: U-Net widths per level (paper (128, 128, 128, 256, 256, 512, 512)).
        attention_levels: self-attention per level (paper: the levels at 16² and 8² of a 256² input).
        num_res_blocks: residual blocks per level (paper 3; the decoder has one more).
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (paper 32).
        rrdb_blocks, rrdb_features, rrdb_growth: G's ``nb``, ``nf``, ``gc`` (paper 12, 64, 32).
        condition_norm: GroupNorm (``norm_num_groups``) on G(I) before the sum (not in the paper). G has no
            normalisation and the first ResBlock normalises F(x_t) + G(I) as one, so G's scale is free to grow; when it
            outgrows F(x_t) the denoiser stops seeing x_t. This keeps G(I) at unit scale.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        image_channels: int = 3,
        mask_channels: int = 1,
        channels: Sequence[int] = (128, 128, 128, 256, 256, 512, 512),
        attention_levels: Sequence[bool] = (False, False, False, False, True, True, False),
        num_res_blocks: Sequence[int] | int = 3,
        num_head_channels: Sequence[int] | int = 32,
        norm_num_groups: int = 32,
        rrdb_blocks: int = 12,
        rrdb_features: int = 64,
        rrdb_growth: int = 32,
        condition_norm: bool = False,
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        encoder = RRDBEncoder(spatial_dims, image_channels, channels[0], rrdb_features, rrdb_growth, rrdb_blocks)
        if condition_norm:
            encoder = nn.Sequential(encoder, nn.GroupNorm(norm_num_groups, channels[0]))
        self.image_encoder = encoder  # G
        self.unet = SegDiffUNet(
            spatial_dims=spatial_dims,
            in_channels=mask_channels,
            out_channels=mask_channels,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
        )  # F = unet.conv_in; E, D = the rest

    @property
    def mask_encoder(self) -> nn.Module:
        """F: the 3×3 conv applied to x_t."""
        return self.unet.conv_in

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        """G(I): image (B, C_img, *S) → (B, channels[0], *S)."""
        return self.image_encoder(image)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, *S), timesteps (B,), G(I) (B, channels[0], *S) → ε̂ (B, C, *S)."""
        return self.unet(x_t, timesteps, features)


class UncachedDenoiser(ConditionalDenoiser):
    """The same denoiser without the conditioning cache: the image encoder runs at every step for every sample.

    For tests and benchmarks (what the cache saves); ``calls`` counts denoiser steps.
    """

    def __init__(self, denoiser: ConditionalDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.calls = 0

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.denoiser.denoise(x_t, timesteps, self.denoiser.encode_condition(features))
