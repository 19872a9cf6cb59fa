"""Image files as both datasets name them (``N.PNG``, ``N.JPEG``): which files count, their order, reading one
or only its size."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def number_key(name: str | Path) -> tuple[int, int, str]:
    """Sort ``N.ext`` numerically (``2`` before ``10``); other names after, by name."""
    stem = Path(name).stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def load_rgb(path: str | Path) -> Image.Image:
    """The image as RGB, fully decoded; an unreadable file raises an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: cannot read image: {exc}") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: cannot read image: {exc}") from exc
