"""The overlay PNG of a segmentation: one drawing for the folder CLI (``scripts/segment.py``) and every bundle's demo.

:func:`save_overlay` draws image, label and uncertainty map (axial slices in radiological view, :func:`radiological`;
class colours :func:`class_rgb`, shared with the RTSTRUCT ROI colours). :class:`SaveOverlayd` is the same picture as a
step of a bundle's inference ``postprocessing`` after ``Invertd``/``SaveImaged``: it re-reads the source image, so the
picture shows the input's own intensities (HU for CT) on its own grid.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data.utils import create_file_basename
from monai.transforms import LoadImage, MapTransform

from diffseg.io import as_numpy, atomic_path

__all__ = ["CT_WINDOW", "SaveOverlayd", "class_rgb", "radiological", "save_overlay"]

CT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (W 400, L 40) for images that look like CT in HU


def radiological(*arrays: Any) -> list[np.ndarray]:
    """3D (C, I, J, K) MetaTensors reoriented to LPS, so ``array[c, :, :, k].T`` is an axial slice in radiological
    view (anterior up, patient's right on the left); arrays without an affine are returned as they are."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    out = []
    for a in arrays:
        if a is not None and isinstance(a, MetaTensor) and a.ndim == 4:
            a = Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(a)
        out.append(None if a is None else as_numpy(a))
    return out


def class_rgb(index: int) -> tuple[int, int, int]:
    """The colour (0–255) of class ``index`` in the overlay PNG and the RTSTRUCT: matplotlib's tab20, cyclic."""
    from matplotlib import colormaps

    return tuple(int(round(255 * c)) for c in colormaps["tab20"].colors[int(index) % 20])


def save_overlay(
    image: np.ndarray,
    label: np.ndarray,
    path: str | os.PathLike[str],
    classes: Mapping[int, str],
    uncertainty: np.ndarray | None = None,
    title: str = "",
    slices: int = 4,
    flag: str = "",
) -> None:
    """A PNG montage of image (C, *S) channel 0 with the label (1, *S) and, if given, uncertainty (C_u, *S) maxed
    over channels. 3D: the ``slices`` slices along the last axis with most foreground; 2D: the image itself. Each
    slice is shown transposed: MONAI's (W, H) for 2D images, LPS arrays (:func:`radiological`) in radiological view.
    Intensities: the CT soft-tissue window when the image looks like HU, else the 1st–99th percentiles. Class colours
    are :func:`class_rgb`. A non-empty ``flag`` (a case flagged for review) is printed in red with a red frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    img, lab = image[0], label[0]
    unc = None if uncertainty is None else uncertainty.max(axis=0)
    if img.ndim == 2:
        img, lab, unc = img[..., None], lab[..., None], None if unc is None else unc[..., None]
    area = (lab > 0).reshape(-1, lab.shape[-1]).sum(0)
    picked = sorted(np.argsort(-area, kind="stable")[: min(slices, lab.shape[-1])])
    low, high = np.percentile(img, [1, 99])
    if low < -500 and high > 0:  # HU
        low, high = CT_WINDOW
    rows = 1 if unc is None else 2
    fig, axes = plt.subplots(rows, len(picked), figsize=(3 * len(picked), 3 * rows + 0.6), squeeze=False)
    top = max(int(lab.max()), 1)
    colors = ListedColormap([np.asarray(class_rgb(v)) / 255 for v in range(top + 1)])
    for col, k in enumerate(picked):
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(img[..., k].T, cmap="gray", vmin=low, vmax=high)
            if row == 0:
                masked = np.ma.masked_equal(lab[..., k].T, 0)
                ax.imshow(masked, cmap=colors, vmin=-0.5, vmax=top + 0.5, alpha=0.5, interpolation="nearest")
                ax.set_title(f"slice {k}" if image[0].ndim == 3 else "", fontsize=8)
            else:
                ax.imshow(unc[..., k].T, cmap="magma", alpha=0.6)
            ax.axis("off")
    present = [int(v) for v in np.unique(lab) if v > 0]
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.asarray(class_rgb(v)) / 255) for v in present]
    fig.legend(handles, [classes.get(v, str(v)) for v in present], loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(title + ("  (row 2: uncertainty)" if rows == 2 else ""), fontsize=9)
    if flag:
        fig.text(0.5, 0.9, flag, ha="center", color="red", fontsize=10, weight="bold")
        fig.patches.append(plt.Rectangle((0, 0), 1, 1, transform=fig.transFigure, fill=False, color="red", lw=6))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<input name stem>_<output_postfix>.png``: :func:`save_overlay` of the source image with
    the label ``d[key]`` (1, *S) and, when ``d[uncertainty_key]`` (C_u, *S) is there, its uncertainty row.

    Place it in a bundle's inference ``postprocessing`` after ``Invertd`` (label and uncertainty on the input's grid)
    and ``AsDiscreted`` (class indices). The source image is re-read from the label's ``filename_or_obj`` metadata
    with MONAI's ``LoadImage`` (``image_only``, ``ensure_channel_first``; a NIfTI / NRRD / PNG / TIFF file or a DICOM
    series folder), so the picture shows the input's own intensities.

    Args:
        keys: the label key(s).
        output_dir: folder of the PNG files.
        classes: class index → name (the metadata's ``channel_def``; keys may be strings).
        uncertainty_key: the uncertainty map's key (missing: no uncertainty row).
        title: the picture's title after the input name, e.g. the bundle's name and version.
        output_postfix: the file name's postfix.
        slices: axial slices of a 3D picture (those with most foreground).
        reader: ``LoadImage``'s reader (None: MONAI's choice by file type, as the bundles' ``LoadImaged``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike[str],
        classes: Mapping[Any, str],
        uncertainty_key: str = "uncertainty",
        title: str = "",
        output_postfix: str = "overlay",
        slices: int = 4,
        reader: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.title, self.postfix, self.slices = Path(output_dir), title, output_postfix, slices
        self.classes = {int(k): str(v) for k, v in classes.items()}
        self.uncertainty_key = uncertainty_key
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)

    def output_path(self, source: str | os.PathLike[str] | Sequence[str]) -> Path:
        """The PNG path of an input file or DICOM folder (a list of DICOM files: named after their folder)."""
        if not isinstance(source, (str, os.PathLike)):
            source = Path(source[0]).parent
        name = create_file_basename(self.postfix, str(Path(source)), self.output_dir, separate_folder=False)
        return Path(f"{name}.png")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            source = label.meta["filename_or_obj"]
            image = self.loader(source)
            if tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise ValueError(f"{source}: image {tuple(image.shape)} and {key} {tuple(label.shape)} grids differ")
            shown = radiological(image, label, d.get(self.uncertainty_key))
            path = self.output_path(source)
            title = " — ".join(t for t in (path.name[: -len(f"_{self.postfix}.png")], self.title) if t)
            save_overlay(*shown[:2], path, self.classes, shown[2], title, self.slices)
        return d
