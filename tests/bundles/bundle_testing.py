"""Helpers shared by the bundle tests: run a bundle in-process, verify its metadata and network, write test images.

Every bundle ships its own ``scripts`` package, so :func:`bundle_imports` puts the bundle root first on ``sys.path``
and forgets any previously imported ``scripts`` modules (as MONAI Label does before each parse).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser, run, verify_metadata, verify_net_in_out

from diffseg.bundles import bundle_imports as _bundle_imports
from diffseg.bundles import bundle_parser, config_files

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "meta_schema_20240725.json"  # offline copy of the model-zoo metadata schema

__all__ = [
    "BUNDLES",
    "REPO",
    "SCHEMA",
    "bundle_imports",
    "check_metadata",
    "check_net_in_out",
    "error_text",
    "load_config",
    "read_nifti",
    "run_bundle",
    "write_nifti",
]


def bundle_imports(bundle: str | Path):
    """``diffseg.bundles.bundle_imports`` for a bundle name (or path)."""
    return _bundle_imports(BUNDLES / bundle)


def run_bundle(bundle: str | Path, configs: Sequence[str] = ("inference.json",), run_id: str = "run", **override: Any):
    """``python -m monai.bundle run`` in-process: ``configs`` are merged in order, ``override`` are id → value."""
    with bundle_imports(bundle) as root:
        return run(
            run_id=run_id,
            config_file=config_files(root, configs),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"),
            bundle_root=str(root),
            **override,
        )


def load_config(bundle: str | Path, configs: Sequence[str] = ("inference.json",), **override: Any) -> ConfigParser:
    """The merged, parsed config (ids resolve with ``parser.get_parsed_content(id)`` inside ``bundle_imports``)."""
    return bundle_parser(BUNDLES / bundle, configs, **override)


def check_metadata(bundle: str | Path) -> None:
    """``python -m monai.bundle verify_metadata`` against the offline schema copy; raises on failure."""
    root = Path(BUNDLES / bundle)
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))


def check_net_in_out(bundle: str | Path, **override: Any) -> None:
    """``python -m monai.bundle verify_net_in_out network_def`` (override e.g. a tiny network or spatial shape)."""
    with bundle_imports(bundle) as root:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            device="cpu",
            bundle_root=str(root),
            **override,
        )


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (spatial axes first) as NIfTI with ``affine`` (default: 1.5 mm isotropic RAS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine), path)
    return path


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI file."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def error_text(exc: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps a transform's error in several layers)."""
    parts = []
    while exc is not None and len(parts) < 20:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)
