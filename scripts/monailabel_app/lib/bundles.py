"""Find the project's bundles on disk, choose the served ones (no model-zoo lookup), check uploaded images."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from monai.transforms import LoadImage

__all__ = ["ImageRejectedError", "InvalidRequestError", "check_readable", "discover_bundles", "select_bundles"]

REQUIRED_FILES = ("configs/inference.json", "configs/metadata.json", "models/model.pt")


class InvalidRequestError(ValueError):
    """A client error (bad parameter, unreadable image): the app answers it with a 4xx status."""


class ImageRejectedError(InvalidRequestError):
    """An image that cannot be read, or that a bundle's preprocessing does not accept (dimensions, channels, NaN)."""


def discover_bundles(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Every bundle folder in ``root`` (sorted by name) that has an inference config, metadata and weights."""
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"bundles folder {str(folder)!r} does not exist")
    return {
        p.name: p.resolve()
        for p in sorted(folder.iterdir())
        if p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)
    }


def select_bundles(available: Mapping[str, Path], models: str | None) -> dict[str, Path]:
    """The bundles named in ``--conf models`` (comma separated, or ``all``/empty for every bundle), in that order.

    Raises:
        ValueError: a name is not a bundle folder; the message lists the available ones (nothing is downloaded).
    """
    if not models or models.strip().lower() == "all":
        return dict(available)
    names = [n.strip() for n in models.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; available: {sorted(available)} (no model-zoo lookup)")
    return {n: available[n] for n in names}


def check_readable(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Load ``path`` with MONAI's readers and return its shape; an unreadable file is :class:`ImageRejectedError`."""
    try:
        image = LoadImage(image_only=True)(str(path))
    except Exception as e:  # every reader's own error type: nibabel, ITK, PIL...
        raise ImageRejectedError(f"{os.path.basename(path)}: not a readable image ({type(e).__name__}: {e})") from e
    return tuple(image.shape)
