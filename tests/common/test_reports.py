"""diffseg.reports.region_disagreement: the per-slice / per-tile disagreement ``analyze.py qc-threshold`` pools."""

from __future__ import annotations

import numpy as np
import pytest

from diffseg.reports import axial_axis, region_disagreement


def test_axial_slices_follow_the_affine_and_need_enough_foreground():
    affine = np.array([[0, 0, 2.0, 0], [0, -2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # voxel axis 0 runs along z
    assert axial_axis(affine) == 0 and axial_axis(np.diag([1.0, 1.0, 5.0, 1.0])) == 2
    label, unc = np.zeros((6, 5, 4), np.uint8), np.full((6, 5, 4), 9.0)  # 9 outside the foreground: never counted
    label[1], unc[1] = 2, 0.2  # 20 voxels
    label[3, :1, :], unc[3] = 1, 0.7  # 4 voxels: too few
    label[4, :3, :] = 3  # 12 voxels, half at 0.1 and half at 0.5
    unc[4, :3, :2], unc[4, :3, 2:] = 0.1, 0.5
    found = region_disagreement(label, unc, affine, min_voxels=10)
    assert found == [
        {"region": "slice 1 of axis 0", "foreground_voxels": 20, "disagreement": pytest.approx(0.2)},
        {"region": "slice 4 of axis 0", "foreground_voxels": 12, "disagreement": pytest.approx(0.3)},
    ]
    assert region_disagreement(label, unc, None, min_voxels=10) == []  # no affine: axis 2, 9 foreground voxels each
    assert len(region_disagreement(label, unc, None, min_voxels=9)) == 4


def test_2d_tiles_of_a_64_grid_with_any_foreground():
    label, unc = np.zeros((100, 70), np.uint8), np.zeros((100, 70))
    label[10:12, 10:12], unc[10:12, 10:12] = 1, 0.25  # tile (0, 0)
    label[90, 66], unc[90, 66] = 1, 0.5  # the bottom-right edge tile (36 × 6 pixels)
    found = region_disagreement(label, unc, tile=64)
    assert found == [
        {"region": "tile 0:64, 0:64", "foreground_voxels": 4, "disagreement": 0.25},
        {"region": "tile 64:128, 64:128", "foreground_voxels": 1, "disagreement": 0.5},
    ]
    with pytest.raises(ValueError, match="grids differ"):
        region_disagreement(label, unc[:, :10])
