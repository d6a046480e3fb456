"""Load a MONAI bundle's configs in-process, with its own ``scripts`` package importable.

Every bundle ships a package named ``scripts``; :func:`bundle_imports` puts one bundle root first on ``sys.path``
and forgets previously imported ``scripts`` modules (as MONAI Label does before each parse), so several bundles can
be used one after another in one process (tests, benchmarks, the folder CLI).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["bundle_imports", "bundle_parser", "config_files"]


def _forget_scripts() -> None:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@contextlib.contextmanager
def bundle_imports(bundle_root: str | os.PathLike[str]) -> Iterator[Path]:
    """Make ``import scripts`` resolve to ``bundle_root``'s own package inside the block."""
    root = Path(bundle_root).resolve()
    _forget_scripts()
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        _forget_scripts()


def config_files(bundle_root: str | os.PathLike[str], configs: Sequence[str]) -> list[str]:
    """Absolute paths of ``configs`` (names in ``<bundle_root>/configs`` or absolute paths), checked to exist."""
    root = Path(bundle_root)
    paths = [str(root / "configs" / c) if not Path(c).is_absolute() else str(c) for c in configs]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config(s) not found: {missing}")
    return paths


def bundle_parser(
    bundle_root: str | os.PathLike[str], configs: Sequence[str] = ("inference.json",), **override: Any
) -> ConfigParser:
    """The merged configs of a bundle with its metadata and ``bundle_root`` set; ``override``: id → value.

    Parse components inside :func:`bundle_imports` when they use the bundle's ``scripts``.
    """
    root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config(config_files(root, configs))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), **override})
    return parser
