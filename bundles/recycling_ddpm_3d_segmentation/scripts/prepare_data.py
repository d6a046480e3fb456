"""Build the demo dataset (MSD-style ``dataset.json``) from the real CTs of the project's data fetcher.

Training: TotalSegmentator patient A (``example_ct.nii.gz``, 3 mm) with its pseudo-labels remapped to the AMOS organs
that patient B's labels also contain. Evaluation ("validation" list): patient B, the 20-slice DICOM series with its
own pseudo-label map. Labels are TotalSegmentator model outputs, not manual annotations.

    python bundles/recycling_ddpm_3d_segmentation/scripts/prepare_data.py --output <folder>
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from diffseg.data import data_path, fetch, prepare_cli, totalseg_class_map, write_dataset_json

# bundle class index → TotalSegmentator "total" class name (AMOS organs present in patients A and B)
CLASSES = {
    1: "spleen",
    2: "liver",
    3: "stomach",
    4: "pancreas",
    5: "adrenal_gland_right",
    6: "aorta",
    7: "inferior_vena_cava",
}


def remap(label_path: Path, out_path: Path) -> dict[str, int]:
    """Write ``label_path`` with TotalSegmentator ids mapped to bundle ids (others → 0); returns voxels per class."""
    names = {name: idx for idx, name in totalseg_class_map("total").items()}
    img = nib.load(str(label_path))
    src = np.asarray(img.dataobj).astype(np.int32)
    out = np.zeros(src.shape, dtype=np.uint8)
    for ours, name in CLASSES.items():
        out[src == names[name]] = ours
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(out, img.affine, img.header), str(tmp))
    os.replace(tmp, out_path)
    return {name: int((out == ours).sum()) for ours, name in CLASSES.items()}


def prepare(output: Path) -> Path:
    """Write the dataset into ``output`` and return the path of its ``dataset.json``."""
    fetch(["totalsegmentator"])
    ts = "totalsegmentator/"
    (output / "imagesTr").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_path(ts + "example_ct.nii.gz"), output / "imagesTr" / "patient_a.nii.gz")
    counts_a = remap(data_path(ts + "example_seg_fast_force_split.nii.gz"), output / "labelsTr" / "patient_a.nii.gz")
    counts_b = remap(data_path(ts + "example_seg_dicom.nii.gz"), output / "labelsTs" / "patient_b.nii.gz")
    dataset = {
        "name": "recycling_ddpm_3d_demo",
        "description": "TotalSegmentator 2.18.0 reference CTs; labels are TotalSegmentator pseudo-labels",
        "labels": {"0": "background", **{str(k): v for k, v in CLASSES.items()}},
        "voxels_per_class": {"patient_a": counts_a, "patient_b": counts_b},
        "training": [{"image": "imagesTr/patient_a.nii.gz", "label": "labelsTr/patient_a.nii.gz"}],
        "validation": [{"image": str(data_path(ts + "example_ct_dicom")), "label": "labelsTs/patient_b.nii.gz"}],
    }
    return write_dataset_json(output, dataset)


def main() -> None:
    prepare_cli(prepare, "recycling_ddpm_3d_segmentation", __doc__)


if __name__ == "__main__":
    main()
