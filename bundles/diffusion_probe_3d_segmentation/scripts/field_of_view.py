"""How much the frozen features of a volume's voxels change when air is added around it (issue 19's diagnosis).

:func:`feature_shift` compares the pyramid of a volume alone with the pyramid of the same voxels inside a frame of air
(same noise): 0 for a backbone whose features are local, large when the deep features carry the whole field of view.

    python bundles/diffusion_probe_3d_segmentation/scripts/field_of_view.py [--frame "[16,32]"] [--weights ...]

prints the relative change per pyramid level for patient A with 64×64×32 windows and in one whole-volume pass.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["feature_shift"]


def feature_shift(segmenter, x: torch.Tensor, frame: Sequence[int], air: float, image_channels: int = 1) -> list[float]:
    """Relative L2 change ``|f(x in frame) - f(x)| / |f(x)|`` of the features of x's voxels, per level (coarse to
    fine).

    Args:
        segmenter: a ``DiffusionProbeSegmenter`` (its ``features``: windowed by its ``roi_size``).
        x: (1, C, H, W, D), H, W, D multiples of the backbone's size divisor.
        frame: voxels of air added on each side of the first two spatial axes (multiples of the size divisor).
        air: the image value of air; the coordinate channels are edge-replicated into the frame.
    """
    fh, fw = (int(f) for f in frame)
    pad = (0, 0, fw, fw, fh, fh)
    image, coords = x[:, :image_channels], x[:, image_channels:]
    framed = torch.cat([F.pad(image, pad, value=air), F.pad(coords, pad, mode="replicate")], 1)
    noise = segmenter.draw_noise(framed)
    inner = noise[..., fh : fh + x.shape[2], fw : fw + x.shape[3], :]
    shifts = []
    for big, small in zip(segmenter.features(framed, noise), segmenter.features(x, inner), strict=True):
        scale = small.shape[2] / x.shape[2]
        h, w = round(fh * scale), round(fw * scale)
        same = big[..., h : h + small.shape[2], w : w + small.shape[3], :]
        shifts.append(float((same - small).norm() / small.norm()))
    return shifts


def main(frame: Sequence[int] = (16, 32), weights: str | None = None, bundle_root: str | None = None) -> None:
    """Patient A (its first 120×96×96 voxels at 3 mm) with the shipped weights: windows of ``roi_size`` and one pass."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root or Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(root))
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / n) for n in ("train.json", "train_demo.json")])
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(weights or root / "models" / "model.pt", weights_only=True))
    item = parser.get_parsed_content("validate#preprocessing")(dict(parser.get_parsed_content("train_datalist")[0]))
    x = item["image"][None].as_tensor()[..., :120, :96, :96]
    for roi in (parser["roi_size"], None):
        net.roi_size = roi or [s + 2 * f for s, f in zip(x.shape[2:], (*frame, 0), strict=True)]
        shifts = feature_shift(net, x, frame, parser.get_parsed_content("air_value"), parser["image_channels"])
        print(f"roi {roi or 'whole volume'}: " + ", ".join(f"level {i} {v:.3f}" for i, v in enumerate(shifts)))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
