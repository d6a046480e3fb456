"""Every bundle's demo ends in a picture: ``configs/demo.json`` switches on ``save_overlay``, and the inference
postprocessing's ``diffseg.SaveOverlayd`` writes ``<output_dir>/<input stem>_overlay.png`` (tiny random networks,
``python -m monai.bundle run`` in-process with the demo's configs)."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_testing import BUNDLES, bundle_imports, load_config, run_bundle, save_weights, write_nifti
from PIL import Image
from test_diffusion_probe_3d_segmentation import TINY as PROBE
from test_diffusion_probe_3d_segmentation import ct
from test_recycling_ddpm_3d_segmentation import TINY as RECYCLING
from test_sdseg_latent_segmentation import TINY as SDSEG
from test_segdiff_2d_segmentation import TINY as SEGDIFF
from test_segdiff_2d_segmentation import blobs

from diffseg.overlay import SaveOverlayd

SAMPLES = {"displayable_configs#num_inference_steps": 2, "displayable_configs#num_samples": 2}
CASES = {  # bundle → (tiny network + settings, picture (width, height): 4 axial slices or the 2D image, 2 rows
    # with the uncertainty map)
    "recycling_ddpm_3d_segmentation": ({**RECYCLING, **SAMPLES, "save_uncertainty": True}, (960, 528)),
    "sdseg_latent_segmentation": (SDSEG, (960, 288)),
    "diffusion_probe_3d_segmentation": (PROBE, (960, 288)),
    "segdiff_2d_segmentation": ({**SEGDIFF, **SAMPLES}, (240, 528)),  # save_uncertainty is on by default
}


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_the_demo_configs_write_the_overlay_picture(tmp_path, bundle):
    tiny, size = CASES[bundle]
    with bundle_imports(bundle):
        net = load_config(bundle, **tiny).get_parsed_content("network_def")
    ckpt = save_weights(net, tmp_path / "tiny.pt")
    if bundle.startswith("segdiff"):
        Image.fromarray(blobs()[0]).save(tmp_path / "cells.png")
        datalist, stem = [{"image": str(tmp_path / "cells.png")}], "cells"
    else:
        write_nifti(tmp_path / "ct.nii.gz", ct((40, 36, 12)), np.diag([3.0, 3.0, 3.0, 1.0]))
        datalist, stem = [str(tmp_path / "ct.nii.gz")], "ct"
    out = tmp_path / "out"
    configs = ("inference.json", "demo.json")
    run_bundle(bundle, configs, **tiny, ckpt_path=ckpt, datalist=datalist, output_dir=str(out))
    assert Image.open(out / f"{stem}_overlay.png").size == size  # `_meta_` references resolve under `run`
    assert (out / f"{stem}_seg.nii.gz").is_file()
    parser = load_config(bundle, configs, **tiny)
    with bundle_imports(bundle):
        (step,) = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, SaveOverlayd)]
    meta = parser.get_parsed_content("_meta_")
    assert step.title == f"{meta['name']} {meta['version']}"
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert step.classes == {int(k): v for k, v in channel_def.items()} and len(step.classes) >= 2


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_the_overlay_is_off_outside_the_demo(bundle):
    with bundle_imports(bundle):
        post = load_config(BUNDLES / bundle).get_parsed_content("postprocessing")
    assert not any(isinstance(t, SaveOverlayd) for t in post.transforms)
