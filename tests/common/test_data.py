"""Tests of diffseg.data: the registry data fetcher (fake pip runner, no network) and the real cached data."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from diffseg import data
from diffseg.data import ChecksumError, FetchError, Source

# A fake map_to_binary.py: fetching must read class_map with ast and never execute the file.
MAP_TO_BINARY = b"""
import os
class_map = {
    "total": {1: "spleen", 2: "kidney_right", 10: "liver"},
    "total_mr": {1: "spleen", 2: "kidney_right"},
    "other": {1: "x"},
}
class_map["total_v3"] = class_map["total"].copy()
raise RuntimeError("map_to_binary.py must never be executed")
"""

CONTENT = {
    "reference_files/example_ct.nii.gz": b"a fake CT volume" * 100,
    "reference_files/example_ct_dicom/CT.1": b"DICM slice one",
    "reference_files/example_ct_dicom/CT.2": b"DICM slice two",
    "reference_files/aorta_report/example_ct.nii.gz": b"another CT",
    "reference_files/unwanted.bin": b"not extracted",
    "fakepkg/map_to_binary.py": MAP_TO_BINARY,
}
OUTPUTS = {
    "reference_files/example_ct.nii.gz": "example_ct.nii.gz",
    "reference_files/example_ct_dicom/CT.1": "example_ct_dicom/CT.1",
    "reference_files/example_ct_dicom/CT.2": "example_ct_dicom/CT.2",
    "reference_files/aorta_report/example_ct.nii.gz": "aorta_ct.nii.gz",
}


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _archive(kind: str, content: dict[str, bytes]) -> tuple[str, bytes]:
    """A fake sdist (tar.gz under ``fakepkg-1.0/``) or wheel (zip) holding ``content``."""
    buf = io.BytesIO()
    if kind == "sdist":
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, payload in content.items():
                info = tarfile.TarInfo("fakepkg-1.0/" + name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        return "fakepkg-1.0.tar.gz", buf.getvalue()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in content.items():
            zf.writestr(name, payload)
    return "fakepkg-1.0-py3-none-any.whl", buf.getvalue()


def _make_source(kind: str, name: str = "totalsegmentator") -> Source:
    """A Source over the fake archive, with correct digests and a derived class_map.json."""
    prefix = "fakepkg-1.0/" if kind == "sdist" else ""
    class_map = data._totalseg_class_map_json(MAP_TO_BINARY)
    return Source(
        name=name,
        spec="fakepkg==1.0",
        kind=kind,
        members={prefix + member: out for member, out in OUTPUTS.items()},
        derived={"class_map.json": (prefix + "fakepkg/map_to_binary.py", data._totalseg_class_map_json)},
        sha256={**{out: _sha(CONTENT[m]) for m, out in OUTPUTS.items()}, "class_map.json": _sha(class_map)},
    )


class FakeRunner:
    """Stands in for pip: writes a fake archive into the ``--dest`` folder, or fails like pip does."""

    def __init__(self, kind: str = "sdist", returncode: int = 0, stderr: str = "", write: bool = True) -> None:
        self.kind, self.returncode, self.stderr, self.write = kind, returncode, stderr, write
        self.content = dict(CONTENT)
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        dest = Path(cmd[cmd.index("--dest") + 1])
        if self.write and self.returncode == 0:
            filename, payload = _archive(self.kind, self.content)
            (dest / filename).write_bytes(payload)
        return subprocess.CompletedProcess(list(cmd), self.returncode, "", self.stderr)


@pytest.fixture
def registry() -> dict[str, Source]:
    return {"totalsegmentator": _make_source("sdist")}


@pytest.fixture(autouse=True)
def _no_ambient_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests pass cache= explicitly; an ambient DIFFSEG_DATA_DIR must not change what they see."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_fetch_extracts_members_to_cache_paths(tmp_path: Path, kind: str) -> None:
    runner = FakeRunner(kind)
    out = data.fetch(cache=tmp_path, runner=runner, registry={"totalsegmentator": _make_source(kind)})
    folder = tmp_path / "totalsegmentator"
    assert out == {"totalsegmentator": folder}
    for member, rel in OUTPUTS.items():
        assert (folder / rel).read_bytes() == CONTENT[member]
    assert not (folder / "unwanted.bin").exists()
    assert sorted(p.name for p in (folder / "example_ct_dicom").iterdir()) == ["CT.1", "CT.2"]
    marker = json.loads((folder / data.MARKER).read_text())
    assert marker["spec"] == "fakepkg==1.0"
    assert marker["files"]["example_ct.nii.gz"]["size"] == len(CONTENT["reference_files/example_ct.nii.gz"])
    assert _leftovers(tmp_path) == []
    cmd = runner.calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "fakepkg==1.0"


def test_class_map_is_parsed_without_executing_the_module(tmp_path: Path, registry: dict[str, Source]) -> None:
    data.fetch(cache=tmp_path, runner=FakeRunner(), registry=registry)
    saved = json.loads((tmp_path / "totalsegmentator" / "class_map.json").read_text())
    assert saved == {"total": {"1": "spleen", "2": "kidney_right", "10": "liver"}, "total_mr": saved["total_mr"]}
    assert data.totalseg_class_map(cache=tmp_path) == {1: "spleen", 2: "kidney_right", 10: "liver"}
    assert data.totalseg_class_map("total_mr", cache=tmp_path) == {1: "spleen", 2: "kidney_right"}
    with pytest.raises(ValueError, match="total_mr"):
        data.totalseg_class_map("other", cache=tmp_path)


def test_class_map_parser_rejects_non_literal_entries() -> None:
    with pytest.raises(ValueError, match="total_mr"):
        data._totalseg_class_map_json(b'class_map = {"total": {1: "spleen"}}')
    with pytest.raises(ValueError):
        data._totalseg_class_map_json(b'class_map = {"total": {1: name}, "total_mr": {}}')
    with pytest.raises(ValueError, match="class_map"):
        data._totalseg_class_map_json(b"maps = {}")


# ------------------------------------------------------------------------------------------------ checksums
def test_checksum_mismatch_names_the_file_and_installs_nothing(tmp_path: Path, registry: dict[str, Source]) -> None:
    good = registry["totalsegmentator"]
    bad = dataclasses.replace(good, sha256={**good.sha256, "example_ct_dicom/CT.2": "ab" * 32})
    with pytest.raises(ChecksumError) as info:
        data.fetch(cache=tmp_path, runner=FakeRunner(), registry={"totalsegmentator": bad})
    message = str(info.value)
    assert "example_ct_dicom/CT.2" in message and "example_ct.nii.gz" not in message
    assert "ab" * 32 in message and _sha(CONTENT["reference_files/example_ct_dicom/CT.2"]) in message
    assert "fakepkg==1.0" in message
    folder = tmp_path / "totalsegmentator"
    assert not (folder / "example_ct_dicom" / "CT.2").exists()
    assert not (folder / "example_ct.nii.gz").exists()  # verified before anything is moved
    assert not (folder / data.MARKER).exists()
    assert _leftovers(tmp_path) == []
    assert data.cache_status(tmp_path, registry)["totalsegmentator"] == "missing"


def test_tampered_download_keeps_the_good_cached_copy(tmp_path: Path, registry: dict[str, Source]) -> None:
    data.fetch(cache=tmp_path, runner=FakeRunner(), registry=registry)
    tampered = FakeRunner()
    tampered.content["reference_files/example_ct.nii.gz"] = b"evil"
    with pytest.raises(ChecksumError, match="example_ct.nii.gz"):
        data.fetch(cache=tmp_path, runner=tampered, registry=registry, force=True)
    path = tmp_path / "totalsegmentator" / "example_ct.nii.gz"
    assert path.read_bytes() == CONTENT["reference_files/example_ct.nii.gz"]
    assert data.cache_status(tmp_path, registry)["totalsegmentator"] == "present"


def test_broken_archive_leaves_no_partial_files(tmp_path: Path, registry: dict[str, Source]) -> None:
    def truncated(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("--dest") + 1])
        filename, payload = _archive("sdist", CONTENT)
        (dest / filename).write_bytes(payload[: len(payload) // 2])
        return subprocess.CompletedProcess(list(cmd), 0, "", "")

    with pytest.raises(FetchError, match="fakepkg-1.0.tar.gz"):
        data.fetch(cache=tmp_path, runner=truncated, registry=registry)
    assert not (tmp_path / "totalsegmentator").exists()
    assert _leftovers(tmp_path) == []


def test_missing_member_is_reported(tmp_path: Path, registry: dict[str, Source]) -> None:
    runner = FakeRunner()
    del runner.content["reference_files/example_ct_dicom/CT.1"]
    with pytest.raises(FetchError, match="example_ct_dicom/CT.1"):
        data.fetch(cache=tmp_path, runner=runner, registry=registry)
    assert not (tmp_path / "totalsegmentator" / "example_ct.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- idempotency
def test_second_fetch_does_not_run_pip_and_force_does(tmp_path: Path, registry: dict[str, Source]) -> None:
    runner = FakeRunner()
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    assert len(runner.calls) == 1
    data.fetch(cache=tmp_path, runner=runner, registry=registry, force=True)
    assert len(runner.calls) == 2
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    assert len(runner.calls) == 2


@pytest.mark.parametrize("damage", ["delete", "same_size_corruption", "marker"])
def test_damaged_cache_is_refetched(tmp_path: Path, registry: dict[str, Source], damage: str) -> None:
    runner = FakeRunner()
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    folder = tmp_path / "totalsegmentator"
    path = folder / "example_ct_dicom" / "CT.1"
    if damage == "delete":
        path.unlink()
    elif damage == "same_size_corruption":
        path.write_bytes(path.read_bytes()[::-1])
    else:
        (folder / data.MARKER).write_text("{not json")
    assert data.cache_status(tmp_path, registry)["totalsegmentator"].startswith("incomplete")
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    assert len(runner.calls) == 2
    assert path.read_bytes() == CONTENT["reference_files/example_ct_dicom/CT.1"]
    assert data.cache_status(tmp_path, registry)["totalsegmentator"] == "present"


def test_changed_pin_is_refetched(tmp_path: Path, registry: dict[str, Source]) -> None:
    runner = FakeRunner()
    data.fetch(cache=tmp_path, runner=runner, registry=registry)
    bumped = {"totalsegmentator": dataclasses.replace(registry["totalsegmentator"], spec="fakepkg==1.1")}
    assert "another version" in data.cache_status(tmp_path, bumped)["totalsegmentator"]
    data.fetch(cache=tmp_path, runner=runner, registry=bumped)
    assert runner.calls[-1][-1] == "fakepkg==1.1" and len(runner.calls) == 2


def test_stale_temporary_folders_are_removed(tmp_path: Path, registry: dict[str, Source]) -> None:
    stale, fresh = tmp_path / ".tmp-totalsegmentator-old", tmp_path / ".tmp-totalsegmentator-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "partial.tar.gz").write_bytes(b"x")
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    data.fetch(cache=tmp_path, runner=FakeRunner(), registry=registry)
    assert not stale.exists() and fresh.exists()  # a concurrent run's folder is left alone


# ----------------------------------------------------------------------------------------- registry errors
def test_registry_failure_raises_fetch_error_with_hint(tmp_path: Path, registry: dict[str, Source]) -> None:
    stderr = (
        "WARNING: Retrying (Retry(total=4)) after connection broken\n"
        "ERROR: Could not find a version that satisfies the requirement fakepkg==1.0 (from versions: none)\n"
        "ERROR: No matching distribution found for fakepkg==1.0\n"
    )
    runner = FakeRunner(returncode=1, stderr=stderr)
    with pytest.raises(FetchError) as info:
        data.fetch(cache=tmp_path, runner=runner, registry=registry)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "fakepkg==1.0" in message and "exit code 1" in message
    assert "Could not find a version" in message and "No matching distribution" in message
    assert "PyPI" in message and "PIP_INDEX_URL" in message and "PIP_FIND_LINKS" in message
    assert not (tmp_path / "totalsegmentator").exists() and _leftovers(tmp_path) == []


def test_pip_success_without_archive_is_an_error(tmp_path: Path, registry: dict[str, Source]) -> None:
    with pytest.raises(FetchError, match="not exactly one sdist"):
        data.fetch(cache=tmp_path, runner=FakeRunner(write=False), registry=registry)


def test_unknown_source_name(tmp_path: Path, registry: dict[str, Source]) -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="nope"):
        data.fetch(["totalsegmentator", "nope"], cache=tmp_path, runner=runner, registry=registry)
    assert runner.calls == []
    data.fetch("totalsegmentator", cache=tmp_path, runner=runner, registry=registry)  # a plain string works too
    assert len(runner.calls) == 1


def test_source_validation() -> None:
    good = _make_source("sdist")
    with pytest.raises(ValueError, match="no digest"):
        dataclasses.replace(good, sha256={k: v for k, v in good.sha256.items() if k != "aorta_ct.nii.gz"})
    with pytest.raises(ValueError, match="relative"):
        dataclasses.replace(good, members={"a": "../escape"}, derived={}, sha256={"../escape": "0" * 64})
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(good, kind="egg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.spec = "other==2"  # type: ignore[misc]


def test_real_registry_is_consistent() -> None:
    assert list(data.SOURCES) == ["totalsegmentator", "stardist", "nilearn", "pydicom-data", "pydicom"]
    ts = data.SOURCES["totalsegmentator"]
    assert ts.spec == "totalsegmentator==2.18.0" and ts.kind == "sdist"
    assert sum(f.startswith("example_ct_dicom/") for f in ts.files) == 20
    assert {"example_ct.nii.gz", "aorta_ct.nii.gz", "class_map.json", "example_seg_mr.nii.gz"} <= set(ts.files)
    assert {s.spec for s in data.SOURCES.values()} >= {"stardist==0.9.2", "nilearn==0.14.1", "pydicom-data==1.0.0"}


# -------------------------------------------------------------------------------------------- cache folder
def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "diffseg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "diffseg"
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert data.cache_dir() == tmp_path / "env"
    assert data.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.setenv(data.ENV_VAR, "")
    assert data.cache_dir() == tmp_path / "xdg" / "diffseg"


def test_fetch_uses_env_cache(tmp_path: Path, registry: dict[str, Source], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    out = data.fetch(runner=FakeRunner(), registry=registry)
    assert out["totalsegmentator"] == tmp_path / "env" / "totalsegmentator"
    assert (tmp_path / "env" / "totalsegmentator" / "example_ct.nii.gz").is_file()
    assert data.data_path("totalsegmentator/aorta_ct.nii.gz").read_bytes() == b"another CT"


def test_data_path(tmp_path: Path) -> None:
    (tmp_path / "stardist").mkdir()
    (tmp_path / "stardist" / "img2d.tif").write_bytes(b"x")
    assert data.data_path("stardist/img2d.tif", cache=tmp_path) == tmp_path / "stardist" / "img2d.tif"
    with pytest.raises(FileNotFoundError) as info:
        data.data_path("stardist/mask2d.tif", cache=tmp_path)
    message = str(info.value)
    assert "stardist/mask2d.tif" in message and str(tmp_path) in message and "stardist==0.9.2" in message
    assert "python scripts/fetch_data.py" in message and "make data" in message
    with pytest.raises(ValueError, match="relative"):
        data.data_path("../etc/passwd", cache=tmp_path)
    with pytest.raises(FileNotFoundError, match="fetch_data.py"):
        data.totalseg_class_map(cache=tmp_path)


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_real_data() -> None:
    """The real cache (fetched once per CI run by `make data`; here a no-op if it is complete)."""
    nib = pytest.importorskip("nibabel")
    pydicom = pytest.importorskip("pydicom")
    tifffile = pytest.importorskip("tifffile")
    import numpy as np

    folders = data.fetch()
    assert set(folders) == set(data.SOURCES)
    assert all(status == "present" for status in data.cache_status().values())

    ct = nib.load(data.data_path("totalsegmentator/example_ct.nii.gz"))
    assert ct.shape == (122, 101, 112)
    assert np.allclose(ct.header.get_zooms()[:3], 3.0)

    dicom = sorted((folders["totalsegmentator"] / "example_ct_dicom").iterdir())
    assert len(dicom) == 20
    for path in dicom:
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (512, 512)  # JPEG 2000 lossless, decoded through Pillow

    image = tifffile.imread(data.data_path("stardist/img2d.tif"))
    mask = tifffile.imread(data.data_path("stardist/mask2d.tif"))
    assert image.shape == mask.shape == (512, 512)
    labels = np.unique(mask)
    assert labels[0] == 0 and len(labels) - 1 == 125  # 125 nuclei; ids are not consecutive (max 183)
    assert 0.15 < (mask > 0).mean() < 0.25

    assert data.totalseg_class_map("total")[1] == "spleen"
    assert data.totalseg_class_map("total_mr")[1] == "spleen"


def test_prepare_cli_hands_the_output_folder_to_prepare_and_writes_4_space_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DIFFSEG_DATA_DIR", str(tmp_path / "cache"))
    seen = []

    def prepare(output: Path) -> Path:
        seen.append(output)
        return data.write_dataset_json(output, {"training": [{"image": "a.nii.gz"}], "validation": []})

    path = data.prepare_cli(prepare, "some_bundle", "doc", argv=[])
    assert seen == [tmp_path / "cache" / "derived" / "some_bundle"] and path == seen[0] / "dataset.json"
    assert path.read_text().startswith('{\n    "training": [\n        {\n            "image": "a.nii.gz"')
    assert capsys.readouterr().out.strip() == str(path)
    assert data.prepare_cli(prepare, "some_bundle", "doc", argv=["--output", str(tmp_path / "x")]).parent == (
        tmp_path / "x"
    )
