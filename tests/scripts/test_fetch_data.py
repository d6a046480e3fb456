"""scripts/fetch_data.py: the command line over diffseg.data (runs from any working directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from diffseg import data

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, data.ENV_VAR: str(cache)}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_data.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cache.parent,  # any working directory
        timeout=120,
        check=False,
    )


def test_cli_list(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "stardist").mkdir(parents=True)
    (cache / "stardist" / "img2d.tif").write_bytes(b"not the real file")
    result = _cli("--list", cache=cache)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"data cache: {cache}"
    for source in data.SOURCES.values():
        row = next(line for line in lines if line.startswith(source.name + " "))
        assert source.spec in row and row.endswith("missing")
    assert not (cache / "totalsegmentator").exists()  # --list downloads nothing


def test_cli_error_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    result = _cli("--sources", "nope", cache=tmp_path / "cache")
    assert result.returncode == 2
    assert "unknown data source" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_scripts_is_not_a_package() -> None:
    assert not (REPO / "scripts" / "__init__.py").exists()


def test_cli_path_prints_a_cached_path_and_fails_clearly_for_a_missing_one(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "stardist").mkdir(parents=True)
    (cache / "stardist" / "img2d.tif").write_bytes(b"x")
    found = _cli("--path", "stardist/img2d.tif", cache=cache)
    assert found.returncode == 0 and found.stdout.strip() == str(cache / "stardist" / "img2d.tif")
    missing = _cli("--path", "stardist/other.tif", cache=cache)
    assert missing.returncode == 1 and "is not in the data cache" in missing.stderr and not missing.stdout
