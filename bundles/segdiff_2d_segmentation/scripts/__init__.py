"""Bundle code of segdiff_2d_segmentation: SegDiff's RRDB-conditioned U-Net, evaluation, data."""

from . import evaluation, network, transforms

__all__ = ["evaluation", "network", "transforms"]
