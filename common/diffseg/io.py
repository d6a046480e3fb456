"""Input checks shared by the bundles (find the images of a folder, reject images a network cannot take) and the
atomic file writes of the outputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

__all__ = ["IMAGE_SUFFIXES", "CheckImaged", "as_numpy", "atomic_path", "list_images"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def list_images(folder: str | os.PathLike[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Sorted paths of the files in ``folder`` (not recursive) whose names end with one of ``suffixes``.

    Raises:
        FileNotFoundError: the folder does not exist, or holds no such file (a bundle run would do nothing).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {str(root)!r} is not a folder")
    found = sorted(str(p) for p in root.iterdir() if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) in {str(root)!r}")
    return found


class CheckImaged(MapTransform):
    """Reject an image (C, *S) with the wrong number of spatial dimensions or channels, or with NaN / inf values.

    Place it right after ``EnsureChannelFirstd``; the error names the file (``filename_or_obj`` metadata).

    Args:
        keys: image key(s).
        spatial_dims: 2 or 3.
        channels: expected channel count (None: any).
    """

    def __init__(self, keys: str | Sequence[str], spatial_dims: int, channels: int | None = None) -> None:
        super().__init__(keys)
        self.spatial_dims, self.channels = spatial_dims, channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", key)
            shape = tuple(img.shape)
            if len(shape) != self.spatial_dims + 1:
                raise ValueError(
                    f"{name}: expected a {self.spatial_dims}D image (channels first: {self.spatial_dims + 1} axes), "
                    f"got shape {shape}"
                )
            if self.channels is not None and shape[0] != self.channels:
                raise ValueError(f"{name}: expected {self.channels} channel(s), got {shape[0]} (shape {shape})")
            if not bool(torch.isfinite(torch.as_tensor(img)).all()):
                raise ValueError(f"{name}: image contains NaN or infinite values")
        return d


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to ``final`` (same suffixes) that is renamed to ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{os.getpid()}.tmp.{final.name}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x)
