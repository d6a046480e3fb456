"""The diffusion backbone of paper 004 (diffusion4med ``FPN``, methods.md §4.1) from MONAI blocks.

A time-conditioned 3D U-Net whose decoder output of every level is returned as a **feature pyramid** (coarse to fine:
the bottom feature, then each up level's output). Per level: ``num_res_blocks`` MONAI ``DiffusionUNetResnetBlock``
(GroupNorm, time-embedding shift, SiLU) and an attention block of the level's type: ``"linear"`` (softmax over q's
channels and k's positions, Katharopoulos / lucidrains style; MONAI has no such block, so it is written here),
``"full"`` (MONAI ``SpatialAttentionBlock``) or ``"none"``. The middle block is Res → attention(deepest type) → Res.
Down: MONAI ``DiffusionUnetDownsample`` (conv s2); up: nearest ×2 + conv 3³ (MONAI ``WrappedUpsample``), concatenated
skip. Pretraining adds a 1×1 conv on the finest level to predict ε.

Time embedding: ``"learned"`` (the authors' ``Embedding(T, d)`` → LayerNorm → Dropout(0.1)) or ``"sinusoidal"``
(MONAI's ``get_timestep_embedding`` → MLP, as ``DiffusionModelUNet``; generalises over t after short training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import (  # the blocks of MONAI's DiffusionModelUNet
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    WrappedUpsample,
    get_timestep_embedding,
)
from monai.utils import convert_to_tensor

__all__ = ["ATTENTION_TYPES", "DiffusionFPN", "LinearAttentionBlock"]

ATTENTION_TYPES = ("none", "linear", "full")


class LinearAttentionBlock(nn.Module):
    """Residual linear attention: ``x + GN(W_o · attn(GN(x)))`` with O(N·d²) cost for N voxels.

    q is soft-maxed over its ``head_dim`` channels, k over the N positions; ``context = k vᵀ`` (d×d per head),
    ``out = contextᵀ q`` (lucidrains ``LinearAttention``, used at the finer levels of diffusion4med's FPN).

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        num_heads, head_dim: attention width ``num_heads·head_dim``.
    """

    def __init__(self, spatial_dims: int, channels: int, num_heads: int = 4, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, head_dim**-0.5
        hidden = num_heads * head_dim
        self.norm = nn.GroupNorm(1, channels)
        self.to_qkv = Convolution(spatial_dims, channels, 3 * hidden, kernel_size=1, bias=False, conv_only=True)
        self.to_out = Convolution(spatial_dims, hidden, channels, kernel_size=1, conv_only=True)
        self.out_norm = nn.GroupNorm(1, channels)
        nn.init.zeros_(self.out_norm.weight)  # starts as the identity, like MONAI's zero-initialised residual convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) → (B, C, *S)."""
        b, c, *spatial = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, self.num_heads, self.head_dim, -1)
        q, k, v = qkv.unbind(1)  # each (B, heads, d, N)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, heads, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, *spatial)
        return x + self.out_norm(self.to_out(out))


def _attention(kind: str, spatial_dims: int, channels: int, num_heads: int, head_dim: int, groups: int) -> nn.Module:
    if kind == "linear":
        return LinearAttentionBlock(spatial_dims, channels, num_heads, head_dim)
    if kind == "full":
        return SpatialAttentionBlock(spatial_dims, channels, num_head_channels=head_dim, norm_num_groups=groups)
    return nn.Identity()


class _Level(nn.Module):
    """``num_blocks`` time residual blocks (the first maps ``in_channels`` → ``channels``) then attention."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, temb: int, num_blocks: int, attn: nn.Module,
                 groups: int) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            DiffusionUNetResnetBlock(spatial_dims, in_channels if i == 0 else channels, temb, channels,
                                     norm_num_groups=groups)
            for i in range(num_blocks)
        )  # fmt: skip
        self.attn = attn

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return self.attn(x)


class PyramidBackbone(nn.Module):
    """What the probe needs of a backbone: ``channels`` (per level, finest first) and
    ``pyramid(x, timesteps, context) -> [coarse … fine]`` feature maps (level l downsampled by 2**(L-1-l))."""

    channels: list[int]

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the pyramid levels, coarse to fine."""
        return self.channels[::-1]

    @property
    def size_divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level)."""
        return 2 ** (len(self.channels) - 1)


class DiffusionFPN(PyramidBackbone):
    """Time-conditioned U-Net returning a feature pyramid (paper 004's backbone, CPU-sizable).

    Args:
        spatial_dims: 3 (2 works for tests).
        in_channels: image channels + coordinate channels (the coordinates are concatenated to the noisy image).
        out_channels: channels of the pretraining output (ε of the image).
        channels: per-level widths, finest first; ``len(channels) - 1`` downsamplings (paper: 32 … 1024).
        attention_types: per level (finest first, the last = the deepest / middle block): ``"linear"``, ``"full"``
            or ``"none"``; the paper: linear at every level, full at the deepest.
        num_res_blocks: residual blocks per down / up level (an int or one per level).
        num_heads, head_dim: attention widths (paper: 4 × 32).
        norm_num_groups: GroupNorm groups of the residual blocks (paper: 4).
        num_train_timesteps: T, for the learned time embedding.
        time_embedding: ``"learned"`` (paper) or ``"sinusoidal"`` (MONAI).

    ``forward(x (B, in_channels - k, *S), timesteps (B,), context (B, k, *S) | None) -> ε̂ (B, out_channels, *S)``
    (MONAI ``DiffusionInferer`` passes the condition as ``context``; here it is concatenated to ``x``);
    :meth:`pyramid` returns the feature maps instead. Spatial sizes must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        attention_types: Sequence[str] = ("linear", "linear", "linear", "full"),
        num_res_blocks: int | Sequence[int] = 1,
        num_heads: int = 4,
        head_dim: int = 32,
        norm_num_groups: int = 4,
        num_train_timesteps: int = 300,
        time_embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        channels = list(channels)
        levels = len(channels)
        if len(attention_types) != levels or any(a not in ATTENTION_TYPES for a in attention_types):
            raise ValueError(
                f"attention_types={list(attention_types)}: need one of {ATTENTION_TYPES} per level ({levels} levels)"
            )
        if time_embedding not in ("learned", "sinusoidal"):
            raise ValueError(f"time_embedding={time_embedding!r}; expected 'learned' or 'sinusoidal'")
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        self.spatial_dims, self.channels, self.in_channels = spatial_dims, channels, in_channels
        self.time_embedding = time_embedding
        temb = 4 * channels[0]
        if time_embedding == "learned":
            self.time_embed = nn.Sequential(
                nn.Embedding(num_train_timesteps, temb), nn.LayerNorm(temb), nn.Dropout(0.1)
            )  # fmt: skip
        else:
            self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))

        def attn(i: int) -> nn.Module:
            return _attention(attention_types[i], spatial_dims, channels[i], num_heads, head_dim, norm_num_groups)

        g = norm_num_groups
        self.stem = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, conv_only=True)
        self.down = nn.ModuleList(
            _Level(spatial_dims, channels[i], channels[i], temb, blocks[i], attn(i), g) for i in range(levels - 1)
        )
        self.downsample = nn.ModuleList(
            DiffusionUnetDownsample(spatial_dims, channels[i], use_conv=True, out_channels=channels[i + 1])
            for i in range(levels - 1)
        )
        c = channels[-1]
        self.mid = nn.ModuleList(
            [DiffusionUNetResnetBlock(spatial_dims, c, temb, c, norm_num_groups=g), attn(levels - 1),
             DiffusionUNetResnetBlock(spatial_dims, c, temb, c, norm_num_groups=g)]
        )  # fmt: skip
        self.upsample = nn.ModuleList(
            WrappedUpsample(
                spatial_dims, mode="nontrainable", in_channels=channels[i + 1], out_channels=channels[i + 1],
                interp_mode="nearest", scale_factor=2.0, pre_conv=None, align_corners=None,
                post_conv=Convolution(spatial_dims, channels[i + 1], channels[i], kernel_size=3, conv_only=True),
            )
            for i in range(levels - 1)
        )  # fmt: skip
        self.up = nn.ModuleList(
            _Level(spatial_dims, 2 * channels[i], channels[i], temb, blocks[i], attn(i), g) for i in range(levels - 1)
        )
        self.out = nn.Sequential(
            nn.GroupNorm(g, channels[0]), nn.SiLU(),
            Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True),
        )  # fmt: skip

    def embed_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) integer steps → (B, 4·channels[0])."""
        t = timesteps.reshape(-1).long()
        if self.time_embedding == "learned":
            return self.time_embed(t)
        return self.time_embed(get_timestep_embedding(t, self.channels[0]))

    def pyramid(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> list:
        """Feature maps, coarse to fine: [(B, channels[-1], *S/2^(L-1)), …, (B, channels[0], *S)]."""
        x = convert_to_tensor(x, track_meta=False)  # plain tensors: MetaTensor bookkeeping per op is slow on CPU
        if context is not None:
            x = torch.cat([x, convert_to_tensor(context, track_meta=False).to(x.dtype)], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"backbone expects {self.in_channels} input channels (image + coordinates), got {x.shape[1]}"
            )
        factor = self.size_divisor
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial shape {tuple(x.shape[2:])} must be divisible by {factor}")
        temb = self.embed_time(convert_to_tensor(timesteps, track_meta=False)).to(x.dtype)
        if temb.shape[0] == 1 and x.shape[0] > 1:
            temb = temb.expand(x.shape[0], -1)
        h = self.stem(x)
        skips = []
        for level, down in zip(self.down, self.downsample, strict=True):
            h = level(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid[0](h, temb)
        h = self.mid[2](self.mid[1](h), temb)
        features = [h]
        for i in reversed(range(len(self.up))):
            h = self.upsample[i](h)
            h = self.up[i](torch.cat([h, skips[i]], dim=1), temb)
            features.append(h)
        return features

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ (B, out_channels, *S) from the finest pyramid level (pretraining)."""
        return self.out(self.pyramid(x, timesteps, context)[-1])
