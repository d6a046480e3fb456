"""Input checks: folder listing and image validation give errors that name the folder or file."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from diffseg.io import CheckImaged, list_images


def test_list_images_finds_supported_files_sorted(tmp_path):
    for name in ("b.nii.gz", "a.nii", "c.NRRD", "notes.txt", "d.mha"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.nii.gz").mkdir()
    assert [p.split("/")[-1] for p in list_images(tmp_path)] == ["a.nii", "b.nii.gz", "c.NRRD", "d.mha"]
    assert [p.split("/")[-1] for p in list_images(tmp_path, [".txt"])] == ["notes.txt"]


def test_list_images_refuses_an_empty_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images .* in .*"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        list_images(tmp_path / "missing")


def image(shape, name="case.nii.gz"):
    return MetaTensor(torch.rand(shape), meta={"filename_or_obj": name})


def test_check_imaged_accepts_the_expected_image():
    d = {"image": image((1, 8, 8, 4))}
    assert CheckImaged("image", spatial_dims=3, channels=1)(d)["image"] is d["image"]


@pytest.mark.parametrize(
    ("shape", "dims", "channels", "match"),
    [
        ((1, 8, 8), 3, 1, "case.nii.gz: expected a 3D image .* got shape \\(1, 8, 8\\)"),
        ((1, 8, 8, 4), 2, None, "case.nii.gz: expected a 2D image"),
        ((3, 8, 8), 2, 1, "case.nii.gz: expected 1 channel\\(s\\), got 3"),
    ],
)
def test_check_imaged_names_the_file_and_the_problem(shape, dims, channels, match):
    with pytest.raises(ValueError, match=match):
        CheckImaged("image", spatial_dims=dims, channels=channels)({"image": image(shape)})


def test_check_imaged_rejects_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        img = image((1, 4, 4))
        img[0, 1, 1] = bad
        with pytest.raises(ValueError, match="case.nii.gz: image contains NaN or infinite values"):
            CheckImaged("image", spatial_dims=2)({"image": img})
