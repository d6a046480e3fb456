"""SDSeg networks: the kl-f8 mask autoencoder (MONAI ``AutoencoderKL``), its latent scaling, the trainable vision
encoder and the concat-conditioned latent denoiser (MONAI ``DiffusionModelUNet``, 8 → 4 channels).

Tensor shapes: images (B, 1 or 3, H, W); masks in x-space (B, 3, H, W) ∈ [-1, 1]; latents (B, 4, H/8, W/8).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from diffseg import ConditionalDenoiser
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder

__all__ = [
    "KLAutoencoder",
    "LatentAutoencoder",
    "SDSegDenoiser",
    "UnconditionalDenoiser",
    "VisionEncoder",
    "load_zero_expanded",
]


def _conv1x1(in_channels: int, out_channels: int) -> Convolution:
    return Convolution(2, in_channels, out_channels, strides=1, kernel_size=1, padding=0, conv_only=True)


class KLAutoencoder(AutoencoderKL):
    """MONAI ``AutoencoderKL`` in the CompVis/diffusers kl-f8 layout (2D).

    Two differences from MONAI's defaults make the LDM layout (and exact checkpoint import) possible:
    ``double_z`` — the encoder outputs 2·latent channels (mean ‖ log-variance, 8 for kl-f8) and ``quant_conv_mu`` /
    ``quant_conv_log_sigma`` read all of them (the halves of LDM's ``quant_conv``); ``decoder_extra_block`` — the
    decoder has ``num_res_blocks + 1`` residual blocks per level, as LDM's ``Decoder``. kl-f8 itself is
    ``channels=(128, 256, 512, 512), num_res_blocks=2, latent_channels=4, norm_num_groups=32``.

    Args:
        channels: block widths (len 4 → ×8 downsampling).
        num_res_blocks: residual blocks per encoder level.
        latent_channels: 4 for kl-f8.
        norm_num_groups: GroupNorm groups.
        with_nonlocal_attn: mid-block attention in encoder and decoder (kl-f8: True).
        double_z, decoder_extra_block: the LDM layout (keep True to import checkpoints).
    """

    def __init__(
        self,
        channels: Sequence[int] = (128, 256, 512, 512),
        num_res_blocks: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        with_nonlocal_attn: bool = True,
        double_z: bool = True,
        decoder_extra_block: bool = True,
    ) -> None:
        levels = len(channels)
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=(False,) * levels,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=with_nonlocal_attn,
            with_decoder_nonlocal_attn=with_nonlocal_attn,
        )
        self.encoder_channels = 2 * latent_channels if double_z else latent_channels
        if double_z:
            self.encoder.blocks[-1] = Convolution(
                2, channels[-1], self.encoder_channels, strides=1, kernel_size=3, padding=1, conv_only=True
            )
            self.quant_conv_mu = _conv1x1(self.encoder_channels, latent_channels)
            self.quant_conv_log_sigma = _conv1x1(self.encoder_channels, latent_channels)
        if decoder_extra_block:
            self.decoder = Decoder(
                spatial_dims=2,
                channels=channels,
                in_channels=latent_channels,
                out_channels=out_channels,
                num_res_blocks=[num_res_blocks + 1] * levels,
                norm_num_groups=norm_num_groups,
                norm_eps=1e-6,
                attention_levels=(False,) * levels,
                with_nonlocal_attn=with_nonlocal_attn,
            )
        for part in (self.encoder, self.decoder):  # GroupNorm → SiLU → conv_out, as in LDM
            part.blocks.insert(len(part.blocks) - 1, nn.SiLU())
        self.downsample = 2 ** (levels - 1)


class LatentAutoencoder(nn.Module):
    """The frozen first stage: mask x (B, 3, H, W) ↔ scaled latent z (B, 4, H/8, W/8).

    ``encode`` returns ``scale_factor · posterior.sample()`` (SDSeg's diffusion target); calling the module decodes
    ``Decoder(z / scale_factor)`` — it is the segmenter's ``latent_decoder``. ``scale_factor`` is a buffer (saved in
    the checkpoint), set to 1/std of the first training batch's latents by :meth:`set_scale_by_std`.
    """

    def __init__(self, autoencoder: KLAutoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @torch.no_grad()
    def raw_latent(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Posterior sample (or mean) of the unscaled latent: (B, 3, H, W) → (B, 4, H/8, W/8)."""
        mu, sigma = self.autoencoder.encode(x)
        return self.autoencoder.sampling(mu, sigma) if sample else mu

    @torch.no_grad()
    def set_scale_by_std(self, raw: torch.Tensor) -> float:
        """``scale_factor = 1 / std(raw)`` (LDM ``scale_by_std``); averaged over ranks under DDP. Returns it."""
        std = raw.detach().float().flatten().std()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(std)
            std = std / torch.distributed.get_world_size()
        self.scale_factor.fill_(float(1.0 / std))
        return float(self.scale_factor)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latent z0 = scale · posterior sample: (B, 3, H, W) → (B, 4, H/8, W/8)."""
        return self.raw_latent(x) * self.scale_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a scaled latent (B, 4, h, w) → x (B, 3, 8h, 8w)."""
        return self.autoencoder.decode(z / self.scale_factor)


class VisionEncoder(nn.Module):
    """SDSeg's trainable image encoder: a copy of the autoencoder's encoder (→ 2·latent channels, no sampling, no
    scale) followed by a new 1×1 conv 8 → 4. Grey images (1 channel) are repeated to the encoder's 3 channels.

    Args:
        autoencoder: the architecture (and, via :meth:`init_from`, the initial weights) to copy.
    """

    def __init__(self, autoencoder: KLAutoencoder) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(autoencoder.encoder).requires_grad_(True)  # trainable even if the AE is frozen
        self.in_channels = autoencoder.encoder.in_channels
        self.proj = _conv1x1(autoencoder.encoder_channels, autoencoder.latent_channels)

    def init_from(self, autoencoder: KLAutoencoder) -> VisionEncoder:
        """Copy the (trained) autoencoder's encoder weights; the 1×1 projection stays as initialised."""
        self.encoder.load_state_dict(autoencoder.encoder.state_dict())
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, 1 or 3, H, W) → conditioning latent c (B, 4, H/8, W/8)."""
        if image.shape[1] == 1 and self.in_channels != 1:
            image = image.expand(-1, self.in_channels, *image.shape[2:])
        return self.proj(self.encoder(image))


class SDSegDenoiser(ConditionalDenoiser):
    """ε-prediction on latents with concat latent fusion: ``unet([z_t, c], t)``, c = vision encoder latent.

    Args:
        vision_encoder: image → c (B, 4, h, w); computed once per image in sampling.
        unet: e.g. MONAI ``DiffusionModelUNet`` with ``in_channels = 8`` (z_t first) and ``out_channels = 4``.
    """

    def __init__(self, vision_encoder: VisionEncoder, unet: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.unet = unet

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(image)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x_t, features], dim=1), timesteps)


class UnconditionalDenoiser(ConditionalDenoiser):
    """The 4-channel U-Net alone, ``unet(z_t, t)``: the unconditional latent prior that :func:`load_zero_expanded`
    turns into SDSeg's starting point (``configs/train_unet_prior.json``). The image is ignored.

    Args:
        unet: e.g. MONAI ``DiffusionModelUNet`` with ``in_channels = out_channels = 4``.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def encode_condition(self, image: torch.Tensor) -> None:
        return None

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, features: None) -> torch.Tensor:
        """z_t (B, 4, h, w), timesteps (B,) → ε̂ (B, 4, h, w)."""
        return self.unet(x_t, timesteps)


def load_zero_expanded(module: nn.Module, state: Mapping[str, torch.Tensor], zeros: bool = True) -> list[str]:
    """Load ``state`` into ``module``; a conv weight (O, I, k…) of a module expecting (O, I+J, k…) becomes
    ``cat(weight, zeros)`` along the input channels (SDSeg's initialisation from an unconditional UNet: the extra
    conditioning inputs start at zero, so the model first behaves like the pretrained one). ``zeros=False`` keeps
    ``module``'s own (random) initialisation for the J extra inputs instead.

    Returns:
        the names of the expanded weights.
    """
    own = module.state_dict()
    expanded, new_state = [], {}
    for name, value in state.items():
        target = own.get(name)
        if target is not None and value.ndim >= 3 and value.ndim == target.ndim and value.shape != target.shape:
            same_rest = value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
            if not same_rest or value.shape[1] > target.shape[1]:
                raise ValueError(f"{name}: cannot expand {tuple(value.shape)} to {tuple(target.shape)}")
            extra = target[:, value.shape[1] :]
            value = torch.cat([value, torch.zeros_like(extra) if zeros else extra.to(value)], dim=1)
            expanded.append(name)
        new_state[name] = value
    module.load_state_dict(new_state)
    return expanded
