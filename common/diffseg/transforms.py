"""Dictionary transforms: per-item pre-processing choice and bundle post-processing."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from diffseg.segmenter import DiffusionSegmenter
from diffseg.uncertainty import UNCERTAINTY_MEASURES

__all__ = ["SegmenterUncertaintyd", "SelectTransformd"]


class SegmenterUncertaintyd(MapTransform):
    """Put the segmenter's last uncertainty map into ``d[key]`` (1, *S) with the metadata of ``d[ref_key]``.

    Use in a bundle's ``postprocessing`` before ``Invertd`` (list the key there too) and ``SaveImaged``, with a
    dataloader batch size of 1: the map belongs to the image the segmenter saw last.

    Args:
        keys: output key(s), e.g. ``"uncertainty"``.
        segmenter: the bundle's ``network_def`` (a :class:`~diffseg.segmenter.DiffusionSegmenter`, possibly wrapped).
        measure: ``"std"`` (class-mean std of the samples' probabilities) or ``"entropy"`` (of the mean, nats).
        ref_key: the prediction whose metadata and applied operations the map takes over.
    """

    def __init__(self, keys: str, segmenter: torch.nn.Module, measure: str = "std", ref_key: str = "pred") -> None:
        super().__init__(keys)
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"measure={measure!r}; expected one of {list(UNCERTAINTY_MEASURES)}")
        self.segmenter = segmenter
        self.measure = measure
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        segmenter = getattr(self.segmenter, "module", self.segmenter)
        maps = getattr(segmenter, "last_uncertainty", None) if isinstance(segmenter, DiffusionSegmenter) else None
        if maps is None:
            raise RuntimeError("the segmenter has no uncertainty yet: run inference before SegmenterUncertaintyd")
        if maps.std.shape[0] != 1:
            raise ValueError(f"uncertainty needs batch size 1, the last call had {maps.std.shape[0]} images")
        value = maps.std.mean(dim=1) if self.measure == "std" else maps.entropy[:, 0]  # (1, *S)
        ref = d[self.ref_key]
        if isinstance(ref, MetaTensor):
            ops = list(ref.applied_operations)
            value = MetaTensor(value.to(ref.device), meta=dict(ref.meta), applied_operations=ops)
        for key in self.keys:  # output keys: not in the data yet
            d[key] = value
        return d


class SelectTransformd(Transform):
    """Apply ``transforms[d[selector]]`` to each item, ``transforms[default]`` when the item has no ``selector``.

    For a datalist that mixes sources needing different pre-processing, e.g. ``{"CT": HU window, "MR": percentile
    scaling}`` chosen by each entry's ``"modality"``. Deterministic, so ``CacheDataset`` caches its output.
    """

    def __init__(self, selector: str, transforms: Mapping[str, Callable], default: str) -> None:
        if default not in transforms:
            raise ValueError(f"default={default!r} is not one of the transforms' names {sorted(transforms)}")
        self.selector, self.transforms, self.default = selector, dict(transforms), default

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        name = data.get(self.selector, self.default)
        if name not in self.transforms:
            raise ValueError(f"{self.selector}={name!r}: expected one of {sorted(self.transforms)}")
        return self.transforms[name](data)
