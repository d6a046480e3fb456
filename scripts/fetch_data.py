"""Fetch the real demo data (medical images shipped in PyPI packages) into the data cache.

    python scripts/fetch_data.py [--cache_dir DIR] [--sources totalsegmentator,stardist] [--force] [--list]
    python scripts/fetch_data.py --path totalsegmentator/example_ct_dicom    # print a cached file's path

Idempotent and checksummed; see diffseg/data.py. The cache defaults to $DIFFSEG_DATA_DIR, else
$XDG_CACHE_HOME/diffseg, else ~/.cache/diffseg; --cache_dir wins over all of them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import fire


def _load_data_module() -> ModuleType:
    """This checkout's common/diffseg/data.py, loaded on its own.

    ``import diffseg.data`` would first run ``diffseg/__init__.py``, which imports torch and MONAI (~7 s); the
    fetcher needs neither, so a no-op run stays well under a second and works before the heavy stack is set up.
    """
    path = Path(__file__).resolve().parents[1] / "common" / "diffseg" / "data.py"
    spec = importlib.util.spec_from_file_location("_diffseg_data", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


data = _load_data_module()


def _list(cache_dir: str | None) -> None:
    """Print every source, its pinned package and whether the cache holds a verified copy."""
    root = data.cache_dir(cache_dir)
    status = data.cache_status(root)
    print(f"data cache: {root}")
    width = max(len(name) for name in data.SOURCES)
    for name, source in data.SOURCES.items():
        print(f"{name:<{width}}  {source.spec:<26}  {status[name]}")


def main(
    cache_dir: str | None = None,
    sources: str | Sequence[str] | None = None,
    force: bool = False,
    list: bool = False,  # noqa: A002 - the flag is --list
    verbose: bool = False,
    path: str | None = None,
) -> None:
    """Fetch data sources (default: all) into the cache; --list shows what is there; --force re-downloads;
    --path REL prints the absolute path of a cached file or folder (for shell commands; fetches nothing)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if path is not None:
            print(data.data_path(path, cache_dir))
        elif list:
            _list(cache_dir)
        else:
            data.fetch(sources=sources, cache=cache_dir, force=force)
    except (data.FetchError, ValueError, OSError) as e:  # FileNotFoundError: --path of a file not cached
        print(f"fetch_data: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)


if __name__ == "__main__":
    fire.Fire(main)
