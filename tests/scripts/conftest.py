"""Fixtures of the command-line tool tests: the recycling bundle with a tiny random network."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles"))
from bundle_testing import BUNDLES, bundle_imports, load_config, save_weights  # noqa: E402
from test_recycling_ddpm_3d_segmentation import TINY  # noqa: E402

RECYCLING = BUNDLES / "recycling_ddpm_3d_segmentation"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Config overrides of the recycling bundle: the TINY network with random, non-trivial weights (its
    zero-initialised output convs would hide export mistakes) and their ``ckpt_path``."""
    with bundle_imports(RECYCLING):
        net = load_config(RECYCLING.name, **TINY).get_parsed_content("network_def")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # the paper's 1.5×1.5×5 mm grid: the tools' small synthetic volumes (~20–36 voxels across) would shrink to
    # 10–18 voxels at the bundle's 3 mm default, below one window of the 4-level U-Net
    pixdim = [1.5, 1.5, 5.0]
    return {**TINY, "pixdim": pixdim, "ckpt_path": save_weights(net, tmp_path_factory.mktemp("tiny") / "tiny.pt")}
