import hashlib

import pytest
from PIL import Image

from moco.course.layout import CLASSES, list_split, read_label_file
from moco.course.tinyset import TINY_CLASSES, generate
from moco.data import find_unlabeled_images


def _digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_course_layout_and_labels(tiny_data):
    unlabeled = find_unlabeled_images(tiny_data / "train")
    assert [p.name for p in unlabeled[:3]] == ["0.PNG", "1.PNG", "2.PNG"] and len(unlabeled) == 256
    with Image.open(unlabeled[0]) as im:
        assert (im.size, im.mode) == ((224, 224), "RGB")
    train, val = list_split(tiny_data / "labeled", "training"), list_split(tiny_data / "labeled", "validation")
    assert [int(p.stem) for p, _ in train] == list(range(1, 49))
    assert [int(p.stem) for p, _ in val] == list(range(49, 65))  # validation continues the numbering
    sizes, names = set(), []
    for image_path, label_path in train + val:
        boxes, labels = read_label_file(label_path)
        with Image.open(image_path) as im:
            width, height = im.size
        sizes.add((width, height))
        assert 1 <= len(boxes) <= 4
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        names += labels
    assert len(sizes) > 10  # images of varied sizes
    assert set(names) <= set(TINY_CLASSES) <= set(CLASSES)
    assert "cup or mug" in names


def test_deterministic_whatever_the_worker_count(tmp_path):
    one = generate(tmp_path / "a", unlabeled=6, train=4, val=2, seed=3, workers=1)
    two = generate(tmp_path / "b", unlabeled=6, train=4, val=2, seed=3, workers=2)
    assert _digest(one) == _digest(two)
    other = generate(tmp_path / "c", unlabeled=6, train=4, val=2, seed=4, workers=1)
    assert _digest(one) != _digest(other)


def test_refuses_to_overwrite_data_it_did_not_write(tmp_path):
    real = tmp_path / "real" / "train" / "unlabeled"
    real.mkdir(parents=True)
    (real / "0.PNG").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not written by moco.course.tinyset"):
        generate(tmp_path / "real", unlabeled=2, train=1, val=1)
    assert (real / "0.PNG").read_bytes() == b"precious"


def test_colour_is_drawn_per_object_not_per_class():
    import numpy as np

    from moco.course.tinyset import render

    centres = []  # 'cup or mug' is a solid circle: its centre pixel is its fill colour
    for seed in range(60):
        image, boxes, names = render(np.random.default_rng(seed), 224, 224)
        pixels = np.asarray(image, dtype=float)
        centres += [pixels[(y0 + y1) // 2, (x0 + x1) // 2] for (x0, y0, x1, y1), name in zip(boxes, names)
                    if name == "cup or mug"]
    assert len(centres) >= 5
    assert np.std(centres, axis=0).min() > 35  # a class colour with +-15 of jitter would give about 10
