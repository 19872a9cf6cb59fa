"""Image files as both datasets name them (``N.PNG``, ``N.JPEG``): which files count, their order, and reading
one as 8-bit RGB whatever its mode, or only its size.

Decoding policy, the same for pretraining, fine-tuning, evaluation and ``demo.check``:
- The whole file is decoded: a truncated file is an error, not a grey tail.
- 16-bit and 32-bit integer greyscale (``I;16``, ``I``) keep their top 8 bits of 16 (values above 65535 saturate);
  Pillow's own ``convert("RGB")`` clips them at 255 instead, which leaves a 16-bit image almost all white.
- Transparency (``RGBA``, ``LA``, palettes with a transparent colour) is composited on white, as a viewer on a
  page shows it; what a transparent pixel happens to store underneath is never used.
- Palette, greyscale, CMYK and the other modes are converted to RGB by Pillow.
- An EXIF orientation tag (JPEG, and PNG's ``eXIf``) is applied, as cameras, browsers and annotation tools show the
  picture; ``image_size`` reports the size after it, so label boxes and pixels agree.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_ORIENTATION = 0x0112  # the EXIF tag
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that rotate by 90 degrees
# What a broken file makes Pillow raise, by format and by stage (open, decode).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class UnreadableImage(RuntimeError):
    """The file is not an image Pillow can decode in full; the message names it."""


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def number_key(name: str | Path) -> tuple[int, int, str]:
    """Sort ``N.ext`` numerically (``2`` before ``10``); other names after, by name."""
    stem = Path(name).stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except _DECODE_ERRORS:  # a broken EXIF block does not make the pixels unreadable
        return 1


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """8-bit RGB by the policy above, and a note for each departure from plain 8-bit RGB."""
    mode, notes = image.mode, []
    if mode.startswith("I"):
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L")
        notes.append(f"{'16' if mode.startswith('I;16') else '32'}-bit greyscale ({mode}), scaled to 8 bits")
    elif mode == "P":
        notes.append("palette (P)")
        if "transparency" in image.info:
            image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(f"transparency ({mode}), composited on white")
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    elif image.mode in ("L", "1") and not notes:
        notes.append(f"greyscale ({mode})")
    elif image.mode not in ("RGB", "L", "P"):
        notes.append(f"mode {mode}, converted by Pillow")
    return image.convert("RGB"), notes


def read_image(path: str | Path) -> tuple[Image.Image, list[str]]:
    """The image as 8-bit RGB, fully decoded and upright, and notes on what was converted (for ``demo.check``)."""
    try:
        with Image.open(path) as image:
            image.load()
            orientation = _orientation(image)
            rgb, notes = _to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: cannot read image: {exc}") from exc
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation}, applied")
    return rgb, notes


def load_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB, fully decoded and upright; an unreadable file raises ``UnreadableImage``."""
    return read_image(path)[0]


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as ``load_rgb`` returns the image (EXIF orientation applied), from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: cannot read image: {exc}") from exc
