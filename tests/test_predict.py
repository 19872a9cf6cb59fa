"""Pictures of detections: demo.draw's boxes and tags, demo.predict on image files, demo.evaluate --save-pictures.

The detector is a tiny untrained one whose box classifier is biased towards one class, so that it finds that class
everywhere with a score near 1: enough boxes to draw, on a CPU, in seconds."""
import json

import numpy as np
import pytest
import yaml
from detector_checkpoints import save_detector
from PIL import Image

from demo import draw
from demo import evaluate as demo_evaluate
from demo import predict as demo_predict
from moco.course.layout import CLASSES
from moco.runtime.unreadable import EXIT_DATAERR

CATEGORY = 4  # the class the biased detector finds: 'person'
NAMES = {i + 1: name for i, name in enumerate(CLASSES)}
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A demo.train-style checkpoint of the course's classes; its classifier gives CATEGORY about 0.99."""
    def tilt(cls_score):
        cls_score.bias[CATEGORY] = 10.0  # label = category id for the course

    return save_detector(tmp_path_factory.mktemp("detector") / "final.pth.tar", NAMES, 64, tilt)


def noise(path, size=(64, 48), seed=0):
    """An image of random pixels, so no drawn colour can pass for the background."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_predict(detector, out, *images, threshold="0.5", batch="2"):
    return demo_predict.main(["--checkpoint-path", str(detector), "--output-dir", str(out), "-j", "0", "-b", batch,
                              "--device", "cpu", "--score-threshold", threshold, *map(str, images)])


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


# demo.predict


def test_pictures_and_results_of_each_image(detector, tmp_path):
    inputs = [noise(tmp_path / "in" / "7.png"), noise(tmp_path / "in" / "9.png", (40, 56), seed=1)]
    images = run_predict(detector, tmp_path / "out", *inputs)
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [im["id"] for im in images] == [7, 9]  # the numbers in the names
    assert results and {r["image_id"] for r in results} == {7, 9}
    for r in results:
        assert set(r) == {"image_id", "file_name", "category_id", "bbox", "score"}
        x, y, w, h = r["bbox"]
        assert r["category_id"] == CATEGORY and r["score"] >= 0.5 and w > 0 and h > 0
        size = (64, 48) if r["image_id"] == 7 else (40, 56)
        assert 0 <= x and x + w <= size[0] + 0.01 and 0 <= y and y + h <= size[1] + 0.01  # x, y, width, height
        assert r["file_name"] == f"{r['image_id']}.png"
    for path in inputs:
        picture, original = rgb(tmp_path / "out" / path.name), rgb(path)
        assert picture.shape == original.shape
        assert (picture != original).any(axis=2).sum() > 20  # boxes were drawn
        assert (picture == draw.class_colour(CATEGORY)).all(axis=2).any()
        mine = [r for r in results if r["file_name"] == path.name]
        assert np.array_equal(picture, np.asarray(draw.annotate(Image.fromarray(original), mine, NAMES)))
    listing = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(im["path"], im["picture"], im["width"], im["height"]) for im in listing["images"]] == [
        (str(inputs[0]), "7.png", 64, 48), (str(inputs[1]), "9.png", 40, 56)]


def test_the_score_threshold_decides_what_is_drawn_and_written(detector, tmp_path):
    source = noise(tmp_path / "a.png")
    run_predict(detector, tmp_path / "out", source, threshold="0.999999")
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []
    assert np.array_equal(rgb(tmp_path / "out" / "a.png"), rgb(source))


def test_folders_expand_to_their_own_images_in_number_order(detector, tmp_path):
    shots = tmp_path / "shots"
    for name in ("10.jpg", "2.PNG", "3.JpEg"):
        noise(shots / name)
    (shots / "notes.txt").write_text("not an image")
    noise(shots / "sub" / "4.png")  # a subfolder's: not read
    other = noise(tmp_path / "other" / "2.png")  # the same stem as shots/2.PNG
    images = run_predict(detector, tmp_path / "out", shots, other, shots / "2.PNG")  # the last: read once
    assert [im["path"] for im in images] == [str(shots / "2.PNG"), str(shots / "3.JpEg"), str(shots / "10.jpg"),
                                            str(other)]
    assert [im["id"] for im in images] == [1, 2, 3, 4]  # 2 twice: the names cannot be the ids
    assert [im["picture"] for im in images] == ["2.png", "3.png", "10.png", "2-2.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "10.png", "2-2.png", "2.png", "3.png", "detections.json", "images.json"]


def test_a_missing_argument_stops_before_any_work(detector, tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nowhere\.png: no such file or folder"):
        run_predict(detector, tmp_path / "out", noise(tmp_path / "a.png"), tmp_path / "nowhere.png")
    assert not (tmp_path / "out").exists()


def test_unreadable_images_are_named_and_the_others_written(detector, tmp_path, capsys):
    """An empty file fails at its header, a truncated one only when decoded in full (in the data loader)."""
    folder = tmp_path / "in"
    good = [noise(folder / "1.png"), noise(folder / "4.png")]
    (folder / "2.png").write_bytes(b"")
    truncated = noise(folder / "3.png")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(SystemExit) as stop:
        run_predict(detector, tmp_path / "out", folder, batch="1")  # a batch of only an unreadable image too
    assert stop.value.code == EXIT_DATAERR
    lines = capsys.readouterr().out.splitlines()
    for name in ("2.png", "3.png"):
        assert sum(f"{folder / name}: cannot read image" in line for line in lines) == 1
    assert "2 of 4 images could not be read" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["1.png", "4.png"]
    listing = {im["id"]: im for im in json.loads((tmp_path / "out" / "images.json").read_text())["images"]}
    assert listing[2]["picture"] is None and "cannot read image" in listing[3]["error"]
    assert {r["image_id"] for r in json.loads((tmp_path / "out" / "detections.json").read_text())} == {1, 4}
    assert all(rgb(tmp_path / "out" / p.name).shape == rgb(p).shape for p in good)


# demo.evaluate --save-pictures


def course_split(root, boxes):
    """A course validation split: image N (160x120 noise) with one box of CATEGORY's class each."""
    for number, box in boxes.items():
        noise(root / "validation" / "images" / f"{number}.JPEG", (160, 120), seed=number)
        (root / "validation" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "validation" / "labels" / f"{number}.yml").write_text(
            yaml.safe_dump({"bboxes": [box], "labels": [NAMES[CATEGORY]]}))
    return root


def test_evaluation_pictures_put_ground_truth_beside_detections(detector, tmp_path):
    boxes = {12: [90, 20, 150, 70], 5: [80, 30, 140, 60], 30: [10, 10, 50, 50]}
    root = course_split(tmp_path / "data", boxes)
    args = ["--checkpoint-path", str(detector), "--dataset-root", str(root), "-j", "0", "--device", "cpu"]
    demo_evaluate.main([*args, "--output-dir", str(tmp_path / "plain")])
    assert not (tmp_path / "plain" / "pictures").exists()  # only when asked for

    demo_evaluate.main([*args, "--output-dir", str(tmp_path / "eval"), "--save-pictures", "2"])
    pictures = tmp_path / "eval" / "pictures"
    assert sorted(p.name for p in pictures.iterdir()) == ["12.png", "5.png"]  # the first two ids
    results = json.loads((tmp_path / "eval" / "detections_validation.json").read_text())
    for number in (5, 12):
        picture = rgb(pictures / f"{number}.png")
        image = Image.fromarray(rgb(root / "validation" / "images" / f"{number}.JPEG"))
        assert picture.shape == (120, 320, 3)
        x0, y0, x1, y1 = boxes[number]
        truth = draw.annotate(image, [{"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": CATEGORY}], NAMES)
        found = [r for r in results if r["image_id"] == number and r["score"] >= 0.5]
        assert found
        detections = draw.annotate(image, found, NAMES)
        top = slice(0, 60)  # above the panels' titles
        assert np.array_equal(picture[top, :160], np.asarray(truth)[top])
        assert np.array_equal(picture[top, 160:], np.asarray(detections)[top])
        assert (picture[y1 - 1, x0:x1] == draw.class_colour(CATEGORY)).all()  # the ground truth's bottom edge
        assert not np.array_equal(picture[100:, :120], np.asarray(truth)[100:, :120])  # the title
