"""Post-processing glue: write single-channel outputs of multi-channel (RGB) inputs as plain 2D images."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["NoChannelMetad"]


class NoChannelMetad(MapTransform):
    """Mark ``d[key]`` (a MetaTensor) as having no channel axis of the input's file layout.

    A label or uncertainty map derived from an RGB PNG inherits ``original_channel_dim = -1`` from the image, and
    ``SaveImaged`` would then treat a spatial axis as channels; setting it to NaN (MONAI's "no channel") writes
    the map as a plain 2D image. Place right before ``SaveImaged``.
    """

    def __init__(self, keys: str | list[str], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["original_channel_dim"] = float("nan")
        return d
