"""Pictures of detections: demo.draw's boxes and tags."""
import numpy as np
import pytest
from PIL import Image

from demo import draw
from moco.course import CLASSES

NAMES = {i + 1: name for i, name in enumerate(CLASSES)}
GREY = (128, 128, 128)


# demo.draw


@pytest.mark.parametrize("side, width", [(200, 1), (600, 2)])
def test_box_outline_covers_exactly_the_box_edge_in_its_class_colour(side, width):
    """The tag sits above the box (rows < 80); below, only the outline's pixels change, all in the class colour."""
    image = Image.new("RGB", (side, side), GREY)
    picture = np.asarray(draw.annotate(image, [{"bbox": [50, 80, 60, 40], "category_id": 7, "score": 0.87}], NAMES))
    x, y = np.meshgrid(np.arange(side), np.arange(side))
    inside = (x >= 50) & (x < 110) & (y >= 80) & (y < 120)
    outline = inside & ((x < 50 + width) | (x >= 110 - width) | (y < 80 + width) | (y >= 120 - width))
    changed = (picture != GREY).any(axis=2)
    assert draw.line_width((side, side)) == width
    assert np.array_equal(changed[80:], outline[80:])
    assert (picture[outline] == draw.class_colour(7)).all()
    assert changed[:80].any() and not changed[:80, :50].any()  # the tag, from the box's left edge on


def test_tag_text_reads_on_every_class_colour():
    """The tag is filled with the class colour and its text has WCAG contrast 4.5 or more against it: black on
    light colours, white on dark ones."""
    for category in NAMES:
        image = Image.new("RGB", (200, 200), GREY)
        picture = np.asarray(draw.annotate(image, [{"bbox": [50, 80, 60, 40], "category_id": category}], NAMES))
        tag = {tuple(map(int, c)) for c in picture[:80].reshape(-1, 3)} - {GREY}
        fill = draw.class_colour(category)
        assert fill in tag
        assert max(draw.contrast(fill, c) for c in tag) >= 4.5, (category, fill)


def test_a_box_in_a_corner_keeps_its_tag_inside_the_image():
    """At the top right the tag moves down over the box and left of the box's left edge, as wide as it is."""
    image = Image.new("RGB", (200, 200), GREY)
    record = {"bbox": [170, 0, 30, 100], "category_id": 7, "score": 0.5}
    changed = (np.asarray(draw.annotate(image, [record], NAMES)) != GREY).any(axis=2)
    assert changed[1:10, 100:170].any() and not changed[20:, :170].any()
