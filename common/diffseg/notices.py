"""Notices of the stack that ask nothing of the user, silenced where they arise: one ``warnings`` filter per notice,
scoped to exactly its message and category (other warnings of the same modules still show), and the level of a
logger whose only warning is such a notice.

Applied on ``import diffseg`` (the bundles' configs import it before any reader is built). A bundle run sets the
logger's level in its own ``configs/logging.conf`` (MONAI's way, and a configured level is never changed here); the
level here serves the command-line tools, which configure no logging. The ``Orientationd`` default-change notice is
avoided by passing ``labels`` explicitly in the configs, and ``make demo`` passes ``-W`` for the ConfigParser trust
notice of the project's own bundles (its message starts with their path).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LOGGER_NOTICES", "NOTICES", "silence_notices"]

# (regular expression matched at the start of the message, category)
NOTICES: tuple[tuple[str, type[Warning]], ...] = (
    # MONAI 1.6 builds its NvImgCodecPydicomReader in every LoadImage; without nvImageCodec (every CPU install) it
    # falls back to pydicom's own decoders, which is what the project uses anyway
    (
        r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully\. "
        r"Falling back to default pydicom decoders\.$",
        UserWarning,
    ),
)


# logger → level: MONAI's nvImageCodec pydicom plugin logs one WARNING, "nvImageCodec is not available; skipping pydicom
# decoder plugin registration." (its other messages are DEBUG)
LOGGER_NOTICES: dict[str, int] = {"monai.data.nvimgcodec_pydicom_plugin": logging.ERROR}


def silence_notices() -> None:
    """Add an ``ignore`` filter for each of :data:`NOTICES`; set each logger of :data:`LOGGER_NOTICES` that has no
    level yet (a logging configuration's level wins)."""
    for message, category in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in LOGGER_NOTICES.items():
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(level)
