"""Derived nuclei dataset for the demo weights: the stardist image tiled, the right quarter held out.

    python bundles/segdiff_2d_segmentation/scripts/prepare_data.py [--output_dir DIR] [--tile 256] [--stride 64]

Reads ``stardist/img2d.tif`` and ``stardist/mask2d.tif`` from the project's data cache (``scripts/fetch_data.py``),
binarises the instance mask (``mask > 0``), writes overlapping ``tile``² PNG tiles of the left three quarters to
``train/``, the right quarter (all rows, last ``width // 4`` columns) to ``heldout/`` and an MSD-style
``dataset.json`` (``training`` = tiles, ``validation`` = the held-out strip) with the training region's intensity
mean/std. Default folder: ``diffseg.data.cache_dir()/derived/segdiff_2d_segmentation``.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import tifffile
from diffseg.data import cache_dir, data_path
from PIL import Image

__all__ = ["DEFAULT_DIR", "prepare", "split_columns", "tile_origins"]

DEFAULT_DIR = "derived/segdiff_2d_segmentation"


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of ``tile``-long windows with step ``stride`` covering ``[0, length)``; the last one flush."""
    if tile > length:
        raise ValueError(f"tile={tile} is larger than the region ({length} pixels)")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def split_columns(width: int, holdout_fraction: float = 0.25) -> int:
    """First held-out column: the right ``holdout_fraction`` of the image is kept for evaluation."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction={holdout_fraction} must lie in (0, 1)")
    return width - int(round(width * holdout_fraction))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.max() <= 255:
        Image.fromarray(array.astype(np.uint8)).save(path)
    else:
        Image.fromarray(array.astype(np.uint16)).save(path)


def prepare(output_dir: str | None = None, tile: int = 256, stride: int = 64, holdout_fraction: float = 0.25) -> dict:
    """Write the tiles, the held-out strip and ``dataset.json``; return the dataset dictionary."""
    out = Path(output_dir) if output_dir else cache_dir() / DEFAULT_DIR
    image = tifffile.imread(data_path("stardist/img2d.tif"))
    mask = (tifffile.imread(data_path("stardist/mask2d.tif")) > 0).astype(np.uint8)
    if image.ndim != 2 or image.shape != mask.shape:
        raise ValueError(f"expected one 2D image and mask of equal shape, got {image.shape} and {mask.shape}")
    cut = split_columns(image.shape[1], holdout_fraction)
    train_img, train_mask = image[:, :cut], mask[:, :cut]
    training = []
    for r in tile_origins(train_img.shape[0], tile, stride):
        for c in tile_origins(train_img.shape[1], tile, stride):
            name = f"r{r:03d}_c{c:03d}.png"
            _save_png(train_img[r : r + tile, c : c + tile], out / "train" / "image" / name)
            _save_png(train_mask[r : r + tile, c : c + tile], out / "train" / "label" / name)
            training.append({"image": f"train/image/{name}", "label": f"train/label/{name}"})
    _save_png(image[:, cut:], out / "heldout" / "image.png")
    _save_png(mask[:, cut:], out / "heldout" / "label.png")
    dataset = {
        "name": "stardist img2d nuclei (DSB2018), SegDiff demo split",
        "description": f"{tile}² tiles (stride {stride}) of columns [0, {cut}); held out: columns [{cut}, "
        f"{image.shape[1]}). Labels: stardist instance mask > 0.",
        "labels": {"0": "background", "1": "nucleus"},
        "intensity_mean": [float(train_img.mean())],
        "intensity_std": [float(train_img.std())],
        "training": training,
        "validation": [{"image": "heldout/image.png", "label": "heldout/label.png"}],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    print(f"{len(training)} training tiles and 1 held-out strip {image[:, cut:].shape} written to {out}")
    return dataset


if __name__ == "__main__":
    fire.Fire(prepare)
