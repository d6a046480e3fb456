"""diffseg.overlay.SaveOverlayd: the source image re-read from the label's filename (NIfTI, PNG, DICOM series folder),
the file name and size, the class colours."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_testing import write_ct_series
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image

from diffseg.overlay import SaveOverlayd, class_rgb

CLASSES = {"0": "background", "1": "spleen", "2": "liver", "3": "stomach"}  # metadata channel_def: string keys


def write_source(kind: str, folder: Path) -> Path:
    """A NIfTI volume, a PNG image or a DICOM series folder; returns the path a bundle's datalist would hold."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        path = folder / "ct.nii.gz"
        volume = np.random.default_rng(0).uniform(-1000, 400, (30, 24, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([-1.5, -1.5, 3.0, 1.0])), path)
    elif kind == "png":
        path = folder / "cells.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52), np.uint8)).save(path)
    else:
        path = folder / "series"
        write_ct_series(path, slices=5)
    return path


def label_of(source: Path) -> MetaTensor:
    """A label (1, *S) on the source's grid, as ``Invertd`` leaves it: class 2 in a block, meta of the source."""
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(source))
    label = MetaTensor(torch.zeros(image.shape, dtype=torch.int64), meta=dict(image.meta))  # its affine too
    block = tuple(slice(s // 4, s // 2 + 1) for s in image.shape[1:])
    label[(0, *block)] = 2
    return label


def colours(path: Path) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}


@pytest.mark.parametrize(("kind", "name", "size"), [
    ("nifti", "ct_overlay.png", (960, 288)),  # 4 axial slices
    ("png", "cells_overlay.png", (240, 288)),  # the image itself
    ("dicom", "series_overlay.png", (960, 288)),
])  # fmt: skip
def test_save_overlayd_redraws_the_source_with_the_class_colours(tmp_path, kind, name, size):
    source = write_source(kind, tmp_path / "in")
    label = label_of(source)
    step = SaveOverlayd("pred", tmp_path / "out", CLASSES, title="bundle 0.1")
    out = step({"pred": label})
    assert out["pred"] is label  # the data pass through
    path = tmp_path / "out" / name
    assert Image.open(path).size == size
    found = colours(path)
    assert class_rgb(2) in found  # the legend's patch of the present class
    assert class_rgb(1) not in found and class_rgb(3) not in found  # absent classes have no colour
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # written atomically: no temporary left


def test_save_overlayd_adds_the_uncertainty_row_and_checks_the_grids(tmp_path):
    source = write_source("nifti", tmp_path / "in")
    label = label_of(source)
    uncertainty = MetaTensor(torch.rand(label.shape), meta=dict(label.meta))
    step = SaveOverlayd("pred", tmp_path, CLASSES)
    step({"pred": label, "uncertainty": uncertainty})
    assert Image.open(tmp_path / "ct_overlay.png").size == (960, 528)  # a second row
    small = MetaTensor(label[:, :10].as_tensor(), meta=dict(label.meta))
    with pytest.raises(ValueError, match="grids differ"):
        step({"pred": small})
