"""Build the demo dataset (MSD-style ``dataset.json``): binary "abdominal organs" foreground from TotalSegmentator.

Foreground = union of the 8 Synapse/BTCV organs of SDSeg's binary setting (aorta, gallbladder, kidneys, liver,
pancreas, spleen, stomach). Training: patient A (``example_ct.nii.gz``, 3 mm, with
``example_seg_fast_force_split.nii.gz``); the training config cuts random axial slices from it. Evaluation
("validation"): patient B, the 20-slice DICOM series with ``example_seg_dicom.nii.gz`` (LAS; the configs align it to
the image by affine). Labels are TotalSegmentator model outputs (pseudo-labels), not manual annotations.

    python bundles/sdseg_latent_segmentation/scripts/prepare_data.py --output <folder>
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from diffseg.data import data_path, fetch, prepare_cli, totalseg_class_map, write_dataset_json

ORGANS = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")


def binary_foreground(label_path: Path, out_path: Path) -> int:
    """Write the union of :data:`ORGANS` of a TotalSegmentator label map as a uint8 {0, 1} NIfTI; returns voxels."""
    ids = [idx for idx, name in totalseg_class_map("total").items() if name in ORGANS]
    img = nib.load(str(label_path))
    out = np.isin(np.asarray(img.dataobj).astype(np.int32), ids).astype(np.uint8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(out, img.affine), str(tmp))
    os.replace(tmp, out_path)
    return int(out.sum())


def prepare(output: Path) -> Path:
    """Write the dataset into ``output`` and return the path of its ``dataset.json``."""
    fetch(["totalsegmentator"])
    ts = "totalsegmentator/"
    (output / "imagesTr").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_path(ts + "example_ct.nii.gz"), output / "imagesTr" / "patient_a.nii.gz")
    n_a = binary_foreground(
        data_path(ts + "example_seg_fast_force_split.nii.gz"), output / "labelsTr" / "patient_a.nii.gz"
    )
    n_b = binary_foreground(data_path(ts + "example_seg_dicom.nii.gz"), output / "labelsTs" / "patient_b.nii.gz")
    dataset = {
        "name": "sdseg_latent_demo",
        "description": "TotalSegmentator 2.18.0 reference CTs; binary abdominal-organ foreground of "
        "TotalSegmentator pseudo-labels",
        "labels": {"0": "background", "1": "abdominal organs (" + ", ".join(ORGANS) + ")"},
        "foreground_voxels": {"patient_a": n_a, "patient_b": n_b},
        "training": [{"image": "imagesTr/patient_a.nii.gz", "label": "labelsTr/patient_a.nii.gz"}],
        "validation": [{"image": str(data_path(ts + "example_ct_dicom")), "label": "labelsTs/patient_b.nii.gz"}],
    }
    return write_dataset_json(output, dataset)


def main() -> None:
    prepare_cli(prepare, "sdseg_latent_segmentation", __doc__)


if __name__ == "__main__":
    main()
