"""Notices that ask nothing of the user are silenced where they arise, each by a filter scoped to its own message:
real warnings of the same modules still show."""

from __future__ import annotations

import logging
import logging.config
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from diffseg.notices import silence_notices

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"


def test_the_nvimgcodec_filter_hides_its_notice_only():
    from monai.data.image_reader import NvImgCodecPydicomReader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_notices()
        NvImgCodecPydicomReader(to_gpu=True)  # the fallback notice, and a real warning of the same reader
    assert [str(w.message).split(";")[0] for w in caught] == ["NvImgCodecPydicomReader ignores to_gpu=True"]


@pytest.mark.parametrize(
    "bundle", sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "logging.conf").is_file())
)
def test_logging_conf_quiets_the_nvimgcodec_logger_only(bundle):
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        logging.config.fileConfig(BUNDLES / bundle / "configs" / "logging.conf", disable_existing_loggers=False)
        plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        assert not plugin.isEnabledFor(logging.WARNING) and plugin.isEnabledFor(logging.ERROR)
        assert logging.getLogger("monai.data.image_reader").isEnabledFor(logging.WARNING)  # others still warn
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_make_demo_trusts_only_the_repositorys_own_bundle_configs():
    (line,) = [x for x in (REPO / "Makefile").read_text().splitlines() if x.startswith("OWN_BUNDLES_TRUSTED =")]
    flags = shlex.split(line.split("=", 1)[1])
    code = (
        "from monai.bundle import run\n"
        "for f in ['bundles/missing/configs/inference.json', '/elsewhere/configs/inference.json']:\n"
        "    try:\n"
        "        run(config_file=[f])\n"
        "    except Exception:\n"
        "        pass\n"
    )
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800)
    notices = [x for x in done.stderr.splitlines() if "Only proceed if this config is from a source you trust" in x]
    assert len(notices) == 1 and notices[0].startswith("parsing config_file ['/elsewhere/"), done.stderr[-2000:]


@pytest.mark.parametrize("bundle", sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/inference.json")))
def test_the_bundles_pass_orientation_labels_so_monai_has_nothing_to_say(bundle):
    from monai.transforms import Orientationd

    from diffseg.bundles import bundle_imports, bundle_parser

    with warnings.catch_warnings(record=True) as caught, bundle_imports(BUNDLES / bundle):
        warnings.simplefilter("always")
        bundle_parser(BUNDLES / bundle).get_parsed_content("preprocessing")
        assert not [w for w in caught if "Orientationd" in str(w.message)]
        Orientationd(keys="image", axcodes="RAS")  # without labels: the notice still shows (no filter hides it)
    assert [w.category for w in caught if "Orientationd" in str(w.message)] == [FutureWarning]
    for config in (BUNDLES / bundle / "configs").glob("*.json"):  # training configs too
        text = config.read_text()
        assert text.count('"Orientationd"') == text.count("\"labels\": \"$(('L', 'R'), ('P', 'A'), ('I', 'S'))\"")


def test_the_tools_quiet_the_nvimgcodec_logger_unless_logging_is_configured():
    plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    saved = plugin.level
    try:
        plugin.setLevel(logging.NOTSET)
        silence_notices()
        assert plugin.level == logging.ERROR  # the folder CLI and analyze.py configure no logging
        plugin.setLevel(logging.DEBUG)  # a user's (or a bundle's logging.conf) level
        silence_notices()
        assert plugin.level == logging.DEBUG
    finally:
        plugin.setLevel(saved)
