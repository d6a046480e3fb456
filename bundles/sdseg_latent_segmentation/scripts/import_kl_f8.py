"""Convert a CompVis (LDM / Stable Diffusion ``first_stage_model``) or diffusers kl-f8 ``AutoencoderKL`` checkpoint
to the names of this bundle's :class:`scripts.network.KLAutoencoder` (MONAI ``AutoencoderKL``).

    python bundles/sdseg_latent_segmentation/scripts/import_kl_f8.py model.ckpt models/autoencoder.pt \
        --channels 128 256 512 512 --num_res_blocks 2

The result is a plain ``{name: tensor}`` state_dict for ``autoencoder_ckpt`` of ``train.json`` (set
``ae_channels``/``ae_num_res_blocks``/``ae_norm_num_groups`` to the checkpoint's layout).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.blocks import Convolution

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.network import KLAutoencoder  # noqa: E402

__all__ = ["compvis_to_diffusers", "diffusers_to_monai", "import_checkpoint"]

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}


def compvis_to_diffusers(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename CompVis ``Encoder``/``Decoder`` keys to diffusers ``AutoencoderKL`` keys (losses are dropped)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("first_stage_model.")
        if key.startswith("loss.") or key.startswith("model_ema."):
            continue
        key = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
        key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
        key = re.sub(
            r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
            lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.",
            key,
        )
        key = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.",
            key,
        )
        key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
        attn = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out|norm)\.(weight|bias)$", key)
        if attn:
            key = f"{attn[1]}.mid_block.attentions.0.{_ATTN[attn[2]]}.{attn[3]}"
            if attn[2] != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]  # 1×1 conv → linear
        key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        out[key] = value
    return out


def _block_prefixes(net: KLAutoencoder) -> tuple[list[str], list[str]]:
    """diffusers prefixes of MONAI ``encoder.blocks[i]`` and ``decoder.blocks[i]``, in block order."""
    levels = len(net.encoder.channels)
    mid = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    has_mid = len(net.encoder.blocks) > 1 + sum(net.encoder.num_res_blocks) + levels - 1 + 3
    enc = ["conv_in"]
    for i in range(levels):
        enc += [f"down_blocks.{i}.resnets.{j}" for j in range(net.encoder.num_res_blocks[i])]
        enc += [f"down_blocks.{i}.downsamplers.0"] if i < levels - 1 else []
    enc += (mid if has_mid else []) + ["conv_norm_out", "conv_act", "conv_out"]
    dec = ["conv_in"] + (mid if has_mid else [])
    dec_blocks = list(reversed(net.decoder.num_res_blocks))
    for i in range(levels):
        dec += [f"up_blocks.{i}.resnets.{j}" for j in range(dec_blocks[i])]
        dec += [f"up_blocks.{i}.upsamplers.0"] if i < levels - 1 else []
    dec += ["conv_norm_out", "conv_act", "conv_out"]
    return enc, dec


def _suffix(block: torch.nn.Module, name: str) -> str:
    """MONAI parameter name inside a block → the diffusers one."""
    if isinstance(block, Convolution):
        return name.removeprefix("conv.")
    for old, new in (
        ("postconv.conv.", "conv."),
        ("nin_shortcut.conv.", "conv_shortcut."),
        ("conv1.conv.", "conv1."),
        ("conv2.conv.", "conv2."),
        ("conv.conv.", "conv."),
        ("attn.out_proj.", "to_out.0."),
        ("attn.", ""),
        ("norm.", "group_norm."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def diffusers_to_monai(state: Mapping[str, torch.Tensor], net: KLAutoencoder) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state_dict → ``net``'s state_dict (strict: every key of ``net`` is filled)."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    enc, dec = _block_prefixes(net)
    for part, prefixes in (("encoder", enc), ("decoder", dec)):
        blocks = getattr(net, part).blocks
        if len(blocks) != len(prefixes):
            raise ValueError(f"{part}: {len(blocks)} MONAI blocks but {len(prefixes)} diffusers blocks")
        for i, (block, prefix) in enumerate(zip(blocks, prefixes, strict=True)):
            for name in block.state_dict():
                out[f"{part}.blocks.{i}.{name}"] = state.pop(f"{part}.{prefix}.{_suffix(block, name)}")
    quant_w, quant_b = state.pop("quant_conv.weight"), state.pop("quant_conv.bias")
    half = quant_w.shape[0] // 2
    out["quant_conv_mu.conv.weight"], out["quant_conv_log_sigma.conv.weight"] = quant_w[:half], quant_w[half:]
    out["quant_conv_mu.conv.bias"], out["quant_conv_log_sigma.conv.bias"] = quant_b[:half], quant_b[half:]
    out["post_quant_conv.conv.weight"] = state.pop("post_quant_conv.weight")
    out["post_quant_conv.conv.bias"] = state.pop("post_quant_conv.bias")
    if state:
        raise ValueError(f"unused checkpoint entries: {sorted(state)[:10]}")
    return out


def import_checkpoint(state: Mapping[str, torch.Tensor], net: KLAutoencoder) -> KLAutoencoder:
    """Load a CompVis or diffusers kl-f8 state_dict (detected by its key names) into ``net``; returns ``net``."""
    if "state_dict" in state and not torch.is_tensor(state["state_dict"]):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if any(".down." in k or ".mid.attn_1." in k for k in state):
        state = compvis_to_diffusers(state, len(net.encoder.channels))
    net.load_state_dict(diffusers_to_monai(state, net))
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="CompVis .ckpt/.pt or diffusers state_dict (.pt/.bin)")
    parser.add_argument("output", type=Path, help="MONAI state_dict to write")
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 512, 512])
    parser.add_argument("--num_res_blocks", type=int, default=2)
    parser.add_argument("--norm_num_groups", type=int, default=32)
    args = parser.parse_args()
    state = torch.load(args.source, map_location="cpu", weights_only=False)  # LDM .ckpt files hold Lightning state
    net = KLAutoencoder(args.channels, args.num_res_blocks, norm_num_groups=args.norm_num_groups)
    import_checkpoint(state, net)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, args.output)
    print(f"wrote {args.output} ({len(net.state_dict())} tensors)")


if __name__ == "__main__":
    main()
