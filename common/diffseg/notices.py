"""Notices of the stack that ask nothing of the user, silenced where they arise: one ``warnings`` filter per notice,
scoped to exactly its message and category (other warnings of the same modules still show).

Applied on ``import diffseg`` (the bundles' configs import it before any reader is built). MONAI's nvImageCodec
*logger* notice is silenced by each bundle's ``configs/logging.conf``, the ``Orientationd`` default-change notice by
passing ``labels`` explicitly in the configs, and ``make demo`` passes ``-W`` for the ConfigParser trust notice of
the project's own bundles (its message starts with their path).
"""

from __future__ import annotations

import warnings

__all__ = ["NOTICES", "silence_notices"]

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


def silence_notices() -> None:
    """Add an ``ignore`` filter for each of :data:`NOTICES`."""
    for message, category in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
