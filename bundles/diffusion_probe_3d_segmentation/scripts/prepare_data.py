"""Build the demo dataset (MSD-style ``dataset.json``) from the real CTs of the project's data fetcher.

- ``"pretraining"`` (unlabeled, for ``pretrain.json``): TotalSegmentator patient A (abdomen CT, 3 mm NIfTI),
  patient C (chest CTA, 1.5 mm) and the abdominal MR (3 mm; ``"modality": "MR"`` selects its intensity scaling).
  Not patient B: the evaluation image stays unseen. Left out: ``example_ct_sm`` (a crop of patient A) and the CT head
  atlas (an average of many heads, no abdomen).
- ``"training"`` (probing head, ``train.json``): patient A with its pseudo-labels mapped to the BTCV organs present in
  it (esophagus is not labelled in A).
- ``"validation"`` (evaluation): patient B's DICOM series with its own pseudo-label map (LAS; aligned by affine in
  the configs). Labels are TotalSegmentator model outputs, not manual annotations.

    python bundles/diffusion_probe_3d_segmentation/scripts/prepare_data.py --output <folder>
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from diffseg.data import data_path, fetch, prepare_cli, totalseg_class_map, write_dataset_json

# bundle class index → TotalSegmentator "total" class (BTCV order; esophagus is absent from patient A's labels)
CLASSES = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
)


def btcv_labels(source: Path, target: Path) -> dict[str, int]:
    """Write ``source`` (TotalSegmentator ids) as bundle ids 0..12 (other structures → 0); returns voxels per class."""
    ids = {name: int(idx) for idx, name in totalseg_class_map("total").items()}
    img = nib.load(str(source))
    lut = np.zeros(max(ids.values()) + 1, dtype=np.uint8)
    lut[[ids[name] for name in CLASSES]] = np.arange(1, len(CLASSES) + 1)
    labels = lut[np.asarray(img.dataobj).astype(np.int64)]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name("partial_" + target.name)
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), str(partial))
    os.replace(partial, target)  # never a half-written file at the final name
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(CLASSES)}


def prepare(output: Path) -> Path:
    """Write the labels and ``dataset.json`` into ``output`` (images are referenced in the data cache)."""
    fetch(["totalsegmentator"])
    ts = "totalsegmentator/"
    counts_a = btcv_labels(
        data_path(ts + "example_seg_fast_force_split.nii.gz"), output / "labelsTr" / "patient_a.nii.gz"
    )
    counts_b = btcv_labels(data_path(ts + "example_seg_dicom.nii.gz"), output / "labelsTs" / "patient_b.nii.gz")
    patient_a, patient_b = str(data_path(ts + "example_ct.nii.gz")), str(data_path(ts + "example_ct_dicom"))
    dataset = {
        "name": "diffusion_probe_3d_demo",
        "description": "TotalSegmentator 2.18.0 reference images (CT A: abdomen, B: DICOM slab, C: chest CTA; an "
        "abdominal MR); labels are TotalSegmentator pseudo-labels",
        "labels": {"0": "background", **{str(i + 1): name for i, name in enumerate(CLASSES)}},
        "voxels_per_class": {"patient_a": counts_a, "patient_b": counts_b},
        "pretraining": [
            {"image": patient_a, "modality": "CT"},
            {"image": str(data_path(ts + "aorta_ct.nii.gz")), "modality": "CT"},
            {"image": str(data_path(ts + "example_mr_sm.nii.gz")), "modality": "MR"},
        ],
        "training": [{"image": patient_a, "label": "labelsTr/patient_a.nii.gz"}],
        "validation": [{"image": patient_b, "label": "labelsTs/patient_b.nii.gz"}],
    }
    return write_dataset_json(output, dataset)


def main() -> None:
    prepare_cli(prepare, "diffusion_probe_3d_segmentation", __doc__)


if __name__ == "__main__":
    main()
