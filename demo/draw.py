"""Pictures of detections, for demo.predict and demo.evaluate --save-pictures: a box outline in a colour per class
and a filled tag "name 0.87" on each box.

Boxes come as COCO records (``bbox`` [x, y, width, height] in pixels, ``category_id``, and ``score`` for
predictions), the one format of both ground truth and results. The outline covers the box's own edge pixels,
inwards. The tag is filled with the class colour and written in black or white, whichever contrasts more with
it, so it reads on any background; it sits above the box, moved down over the box where there is no room above.
"""
from __future__ import annotations

import colorsys
from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont

BLACK, WHITE = (0, 0, 0), (255, 255, 255)
_GOLDEN = 0.6180339887  # hue step between successive class ids


def class_colour(category_id: int) -> tuple[int, int, int]:
    """A saturated colour per class: successive ids step round the hue circle by the golden ratio, so the few
    classes of one picture (neighbouring ids included) rarely look alike."""
    r, g, b = colorsys.hsv_to_rgb((category_id * _GOLDEN) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def _luminance(colour: tuple[int, int, int]) -> float:
    """WCAG relative luminance, 0 (black) to 1 (white)."""
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG contrast ratio, 1 to 21; text is comfortably legible from 4.5."""
    la, lb = sorted((_luminance(a), _luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``fill`` (never below 4.58, the worst case of the better)."""
    return BLACK if contrast(fill, BLACK) >= contrast(fill, WHITE) else WHITE


def line_width(size: tuple[int, int]) -> int:
    """Outline width in pixels: 1 up to 300-pixel images, thicker on large ones, where 1 pixel gets lost."""
    return max(1, round(min(size) / 300))


def _font(size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system font needed), 11 pixels up to 330-pixel images, larger beyond."""
    return ImageFont.load_default(max(11, round(min(size) / 30)))


def _tag(draw: ImageDraw.ImageDraw, size: tuple[int, int], x: float, y: float, text: str,
         fill: tuple[int, int, int], font) -> None:
    """``text`` on a ``fill`` rectangle with its left edge at ``x`` and its bottom just above ``y``, shifted to stay
    inside an image of ``size`` (over a box's top edge where there is no room above it)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x0 = max(0, min(round(x), size[0] - width))
    y0 = max(0, min(round(y) - height, size[1] - height))
    draw.rectangle([x0, y0, x0 + width - 1, y0 + height - 1], fill=fill)
    draw.text((x0 + pad - left, y0 + pad - top), text, fill=text_colour(fill), font=font)


def annotate(image: Image.Image, records: Iterable[dict], names: dict[int, str]) -> Image.Image:
    """A copy of ``image`` with every record's box and tag drawn: all outlines first, then the tags over them,
    the highest score last."""
    picture = image.convert("RGB")  # a copy, even of an RGB image
    draw = ImageDraw.Draw(picture)
    width, font = line_width(picture.size), _font(picture.size)
    records = list(records)
    for record in records:
        x, y, w, h = record["bbox"]
        # Pixels x .. x+w-1 are the box's: the outline lies on its edge pixels, not one beyond.
        draw.rectangle([round(x), round(y), max(round(x), round(x + w) - 1), max(round(y), round(y + h) - 1)],
                       outline=class_colour(record["category_id"]), width=width)
    for record in sorted(records, key=lambda r: r.get("score", 0)):  # the surest tag on top where tags overlap
        x, y, _, _ = record["bbox"]
        name = names.get(record["category_id"], str(record["category_id"]))
        text = f"{name} {record['score']:.2f}" if "score" in record else name
        _tag(draw, picture.size, x, y, text, class_colour(record["category_id"]), font)
    return picture


def side_by_side(left: Image.Image, right: Image.Image, titles: tuple[str, str]) -> Image.Image:
    """``left`` and ``right`` in one picture as wide as both, each titled in a black tag at its bottom left."""
    picture = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), WHITE)
    picture.paste(left, (0, 0))
    picture.paste(right, (left.width, 0))
    draw, font = ImageDraw.Draw(picture), _font(left.size)
    _tag(draw, picture.size, 0, left.height, titles[0], BLACK, font)
    _tag(draw, picture.size, left.width, right.height, titles[1], BLACK, font)
    return picture
