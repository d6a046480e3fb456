"""Bundle code of segdiff_2d_segmentation: SegDiff's RRDB-conditioned U-Net, feed-forward training, evaluation, data."""

from . import evaluation, feedforward, network, transforms

__all__ = ["evaluation", "feedforward", "network", "transforms"]
