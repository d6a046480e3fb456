"""Anatomical guidance: coordinate channels for each voxel (paper 004's body-part coordinates, public equivalent).

The authors' body-part regressor is not public (methods.md §4.2). :class:`BodyCoordinatesd` provides two sources:

- ``"body_box"`` (default): each voxel's scanner-space position (x, y, z in mm, from the image's affine) normalised
  to ``[-1, 1]`` over the bounding box of the body, found as the voxels above a threshold (-500 HU in the bundle
  configs, given in the image's intensity units at the transform's place in the pipeline; with ``largest_component``
  only their largest connected component, so that the table, a blanket or a stray bright voxel in the air do not
  widen the box). The coordinates
  are anatomical up to the body's extent (head–feet position inside the scanned range, left–right and
  front–back inside the body) and do not depend on the voxel grid: flipping or resampling the image moves them with
  the anatomy. ``axes`` keeps some of them: ``(0, 1)`` (left–right, back–front) drops the head–feet coordinate, which
  is relative to the scanned range and so means different anatomy in a whole abdomen and in a 20-slice slab.
- ``"file"``: an external regressor's coordinate map, one file per image (``<coords_dir>/<image file name>``, any
  channel count, e.g. 3 for mishgon/ape's anatomical positional embeddings), resampled onto the image grid by affine.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, ResampleToMatch
from monai.transforms.utils import get_largest_connected_component_mask

__all__ = ["COORDINATE_SOURCES", "BodyCoordinatesd", "body_box_coordinates", "voxel_positions"]

COORDINATE_SOURCES = ("body_box", "file")


def voxel_positions(affine: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Scanner-space positions (3, *S) in mm of every voxel centre: ``affine @ [i, j, k, 1]``."""
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in spatial_shape), indexing="ij")
    index = torch.stack([*grids, torch.ones_like(grids[0])]).reshape(4, -1)
    return (affine.to(torch.float64) @ index)[:3].reshape(3, *spatial_shape)


def body_box_coordinates(
    image: torch.Tensor,
    affine: torch.Tensor,
    threshold: float = -500.0,
    axes: Sequence[int] = (0, 1, 2),
    largest_component: bool = False,
) -> torch.Tensor:
    """Scanner positions normalised to ``[-1, 1]`` over the body's bounding box (voxels ≥ ``threshold``).

    Args:
        image: (C, *S) CT (channel 0 is used), e.g. in HU.
        affine: (4, 4) voxel → scanner (mm) matrix.
        threshold: body mask threshold in the image's units; if no voxel passes, the whole image is the box.
        axes: the scanner axes (0 = x, 1 = y, 2 = z) that get a channel, in this order.
        largest_component: the body is the largest connected component of the thresholded voxels (MONAI's
            ``get_largest_connected_component_mask``), not all of them.

    Returns:
        (len(axes), *S) float32; values outside the body box extend beyond ``[-1, 1]``.
    """
    pos = voxel_positions(affine, image.shape[1:])  # (3, *S)
    body = torch.as_tensor(image[0]) >= threshold
    if largest_component and bool(body.any()):
        body = get_largest_connected_component_mask(body)
    inside = pos[:, body] if bool(body.any()) else pos.reshape(3, -1)
    low, high = inside.amin(dim=1), inside.amax(dim=1)
    span = (high - low).clamp_min(1e-6)
    shape = (3,) + (1,) * (pos.ndim - 1)
    coords = (pos - low.reshape(shape)) / span.reshape(shape) * 2 - 1
    return coords[list(axes)].to(torch.float32)


class BodyCoordinatesd(MapTransform):
    """Write coordinate channels (k, *S) for ``keys`` into ``coords_key`` (a MetaTensor with the image's metadata).

    Place it after ``Orientationd``/``Spacingd`` (any place works: the coordinates come from the affine). With
    ``concat=True`` the channels are appended to the image instead (the probing network's input
    ``[image, coordinates]``), so put it after the intensity scaling then.

    Args:
        keys: the image key.
        coords_key: output key (ignored with ``concat``).
        source: ``"body_box"`` or ``"file"`` (see the module docstring).
        threshold: body threshold for ``body_box`` in the image's units at this point of the pipeline.
        coords_dir: folder of the external coordinate maps for ``file``; a map has the image's file name.
        concat: append the coordinates to the image channels.
        axes: scanner axes that get a ``body_box`` channel (default all three; ``(0, 1)`` for in-plane only).
        largest_component: ``body_box`` uses the largest connected component of the thresholded voxels.

    Raises:
        ValueError: an unknown source, ``file`` without ``coords_dir``, or axes that are not distinct ones of 0, 1, 2.
        FileNotFoundError: the coordinate map of an image is missing (the message names both files).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        coords_key: str = "coords",
        source: str = "body_box",
        threshold: float = -500.0,
        coords_dir: str | os.PathLike[str] | None = None,
        concat: bool = False,
        axes: Sequence[int] = (0, 1, 2),
        largest_component: bool = False,
    ) -> None:
        super().__init__(keys)
        self.largest_component = largest_component
        self.axes = [int(a) for a in axes]
        if not self.axes or len(set(self.axes)) != len(self.axes) or not set(self.axes) <= {0, 1, 2}:
            raise ValueError(f"coordinate axes={list(axes)}; expected distinct scanner axes among 0, 1, 2")
        if source not in COORDINATE_SOURCES:
            raise ValueError(f"coordinate source={source!r}; expected one of {COORDINATE_SOURCES}")
        if source == "file" and not coords_dir:
            raise ValueError("coordinate source 'file' needs coords_dir (a folder with one map per image)")
        self.coords_key, self.source, self.threshold = coords_key, source, threshold
        self.coords_dir, self.concat = coords_dir, concat

    def _from_file(self, image: MetaTensor) -> torch.Tensor:
        name = Path(str(image.meta.get("filename_or_obj", ""))).name
        path = Path(self.coords_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"coordinate map {str(path)!r} for image {name!r} not found")
        coords = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
        return ResampleToMatch(mode="bilinear")(coords, image).as_tensor().to(torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"{key!r} must be a MetaTensor with an affine (load it with LoadImaged)")
            if self.source == "file":
                coords = self._from_file(image)
            else:
                coords = body_box_coordinates(
                    image.as_tensor(), image.affine, self.threshold, self.axes, self.largest_component
                )
            coords = MetaTensor(coords, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            if self.concat:
                d[key] = torch.cat([image, coords.to(image.dtype)], dim=0)
            else:
                d[self.coords_key] = coords
        return d
