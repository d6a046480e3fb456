"""How much the frozen features of a volume's voxels change when air is added around it (issue 19's diagnosis).

:func:`feature_shift` compares the pyramid of a volume alone with the pyramid of the same voxels inside a frame of air
(same noise): 0 for a backbone whose features are local, large when the deep features carry the whole field of view.

    python bundles/diffusion_probe_3d_segmentation/scripts/field_of_view.py [--frame "[16,32]"] [--weights ...]

prints the relative change per pyramid level for patient A with 64×64×32 windows and in one whole-volume pass;
with ``--slabs "[32,14]"`` it prints instead the head's Dice on patient A's training canvas read whole and as
consecutive thin slabs (:func:`read_in_slabs`; patient B has 14 slices at 3 mm).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["FIVE_ORGANS", "feature_shift", "read_in_slabs"]

FIVE_ORGANS = ("liver", "spleen", "stomach", "aorta", "inferior vena cava")  # issue 19's five-organ mean


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


def read_in_slabs(segmenter, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Logits (1, K, H, W, D) of x (1, C, H, W, D) read as consecutive slabs of ``depth`` slices (the last axis), each
    on its own, as the segmenter reads a thin series (the last slab may be thinner)."""
    return torch.cat([segmenter(x[..., z : z + int(depth)]) for z in range(0, x.shape[-1], int(depth))], dim=-1)


def _slab_report(parser, net, depths: Sequence[int]) -> None:
    """Five-organ Dice of the head on patient A's training canvas (``train#deterministic_transforms``), whole and in
    slabs of each depth."""
    from diffseg.metrics import dice_per_class
    from monai.transforms import Compose

    item = Compose(parser.get_parsed_content("train#deterministic_transforms"))(
        dict(parser.get_parsed_content("train_datalist")[0])
    )
    x, label = item["image"][None].as_tensor(), item["label"][None].as_tensor()
    classes, names = parser["num_classes"], parser["channel_names"]
    index = {names[k]: int(k) - 1 for k in names}
    for depth in (None, *depths):
        with torch.no_grad():
            logits = net(x) if depth is None else read_in_slabs(net, x, depth)
        dice = dice_per_class(logits.argmax(1, keepdim=True), label, classes)[0]
        five = {o: float(dice[index[o]]) for o in FIVE_ORGANS}
        mean = sum(five.values()) / len(five)
        tag = f"slabs of {depth}" if depth else f"whole {tuple(x.shape[2:])}"
        print(f"A canvas {tag}: five-organ mean {mean:.3f} | " + ", ".join(f"{o} {v:.3f}" for o, v in five.items()))


def main(
    frame: Sequence[int] = (16, 32),
    weights: str | None = None,
    bundle_root: str | None = None,
    slabs: Sequence[int] | None = None,
) -> None:
    """Patient A (its first 120×96×96 voxels at 3 mm) with the shipped weights: windows of ``roi_size`` and one pass;
    or, with ``slabs``, the head's Dice on A's training canvas whole and in slabs."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root or Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(root))
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / n) for n in ("train.json", "train_demo.json")])
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(weights or root / "models" / "model.pt", weights_only=True))
    if slabs:
        return _slab_report(parser, net, [int(d) for d in slabs])
    item = parser.get_parsed_content("validate#preprocessing")(dict(parser.get_parsed_content("train_datalist")[0]))
    x = item["image"][None].as_tensor()[..., :120, :96, :96]
    for roi in (parser["roi_size"], None):
        net.roi_size = roi or [s + 2 * f for s, f in zip(x.shape[2:], (*frame, 0), strict=True)]
        shifts = feature_shift(net, x, frame, parser.get_parsed_content("air_value"), parser["image_channels"])
        print(f"roi {roi or 'whole volume'}: " + ", ".join(f"level {i} {v:.3f}" for i, v in enumerate(shifts)))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
