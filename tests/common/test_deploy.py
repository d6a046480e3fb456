"""diffseg.deploy helpers and what it uses: radiological display orientation (diffseg.overlay), atomic files
(diffseg.io), exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from diffseg.deploy import exit_code
from diffseg.io import atomic_path
from diffseg.overlay import radiological


def test_radiological_puts_anterior_up_and_patient_right_on_the_left():
    volume = torch.zeros(1, 4, 5, 3)
    affine = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # RAS: axis 0 runs toward patient Left, axis 1 Anterior
    volume[0, 3, 4, 1] = 1.0  # the leftmost, most anterior voxel
    (shown,) = radiological(MetaTensor(volume, affine=affine))
    slice_ = shown[0, :, :, 1].T  # rows: anterior → posterior, columns: patient right → left
    assert slice_.shape == (5, 4)
    assert tuple(np.argwhere(slice_ == 1)[0]) == (0, 3)  # top row (anterior), right column (patient's left)
    plain = np.zeros((1, 4, 4))
    assert radiological(plain, None)[0] is plain and radiological(plain, None)[1] is None


def test_atomic_path_renames_only_on_success(tmp_path):
    with atomic_path(tmp_path / "a" / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".tmp.x.nii.gz")
        tmp.write_text("done")
    assert (tmp_path / "a" / "x.nii.gz").read_text() == "done"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "y.nii.gz") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.nii.gz"]


def test_exit_code():
    assert exit_code({"cases": [{"status": "ok"}, {"status": "skipped"}]}) == 0
    assert exit_code({"cases": [{"status": "ok"}, {"status": "failed"}]}) == 1
