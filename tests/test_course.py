"""The course layout's label files and pairing, and the label policy of moco.course.labels: every problem of a split is
found in one pass; errors stop a load, all listed; boxes outside their image are clamped, boxes without area go."""
import logging
import re

import pytest
from PIL import Image

from demo.datasets import course_split
from moco.course.labels import fit_boxes, summary
from moco.course.layout import CLASSES, list_split, parse_label_file, read_label_file, scan_split


def test_course_classes_in_loader_order():
    assert len(CLASSES) == 100 and len(set(CLASSES)) == 100
    assert CLASSES[0] == "cup or mug"


def test_label_file_round_trip(tmp_path):
    path = tmp_path / "1.yml"
    path.write_text("bboxes:\n- [1, 2, 30, 40]\nlabels:\n- cup or mug\nimage_size: [64, 64]\n")
    assert read_label_file(path) == ([[1.0, 2.0, 30.0, 40.0]], ["cup or mug"])


def test_background_image_has_no_problem(tmp_path):
    (tmp_path / "1.yml").write_text("bboxes: []\nlabels: []\n")
    assert parse_label_file(tmp_path / "1.yml") == ([], [], [])


@pytest.mark.parametrize("text, kind, detail", [
    ("bboxes: [[1, 2, 3, 4]]\nlabels: []\n", "length mismatch", "1 bboxes but 0 labels"),
    ("bboxes: [[1, 2, 3]]\nlabels: [dog]\n", "malformed box", r"bbox 0 \[1, 2, 3\] is not \[xmin"),
    ("bboxes: [[1, 2, .nan, 4]]\nlabels: [dog]\n", "malformed box", "bbox 0"),
    ("bboxes: [[1, 2, 3, 4]]\nlabels: [dgo]\n", "unknown class", r"\['dgo'\]; the course's names"),
    ("just text", "label file without bboxes/labels", "found a str"),
    ("boxes: []\nlabels: []\n", "label file without bboxes/labels", r"found keys \['boxes', 'labels'\]"),
    ("", "empty label file", ""),
    ("bboxes: [[1, 2\nlabels: x", "YAML that does not parse", "while parsing"),
    # The original parsed labels with a loader that builds arbitrary Python objects.
    ("bboxes: !!python/object/apply:os.system ['echo hacked']\nlabels: []\n", "YAML that does not parse",
     "could not determine a constructor"),
])
def test_each_bad_label_file_is_named_with_its_problem(tmp_path, text, kind, detail):
    path = tmp_path / "7.yml"
    path.write_text(text)
    boxes, names, problems = parse_label_file(path)
    assert (boxes, names) == ([], [])
    assert [p.kind for p in problems] == [kind] and all(p.is_error for p in problems)
    assert problems[0].path == path
    assert re.search(detail, problems[0].detail)
    with pytest.raises(ValueError, match="7.yml"):
        read_label_file(path)


def test_boxes_are_fitted_to_the_image():
    boxes = [[-5, 2, 30, 40], [10, 10, 10, 20], [5, 5, 4, 9], [70, 5, 90, 9], [1, 2, 3, 4], [0, 0, 64, 48.5]]
    kept, fitted, problems = fit_boxes("1.yml", boxes, 64, 48)
    assert kept == [0, 4, 5]
    assert fitted == [[0.0, 2.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 64.0, 48.0]]
    assert [(p.kind, p.detail.split(" ")[1]) for p in problems] == [
        ("box outside the image (clamped)", "0"), ("box without area (dropped)", "1"),
        ("box without area (dropped)", "2"), ("box without area (dropped)", "3"),
        ("box outside the image (clamped)", "5")]
    assert "inside the 64x48 image" in problems[3].detail and not any(p.is_error for p in problems)


def _split(root, files: dict[str, str | None], size=(64, 48)):
    """Files of <root>/training: ``N.yml`` -> label text (with an image N.JPEG unless the name says .orphan);
    ``N.JPEG`` -> None, an image without a label."""
    for sub in ("images", "labels"):
        (root / "training" / sub).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        stem = name.split(".")[0]
        if name.endswith(".JPEG") or not name.endswith(".orphan"):
            Image.new("RGB", size).save(root / "training" / "images" / f"{stem}.JPEG")
        if text is not None:
            (root / "training" / "labels" / f"{stem}.yml").write_text(text)


def test_a_split_lists_every_bad_label_file_at_once(tmp_path):
    good = "bboxes: [[1, 2, 30, 40]]\nlabels: [dog]\n"
    _split(tmp_path, {"1.yml": good, "2.yml": "bboxes: [[1, 2, 3, 4]]\nlabels: []\n", "3.yml": good,
                      "4.yml": "bboxes: [[1, 2, 3, 4]]\nlabels: []\n", "5.yml": "bboxes: [[1, 2, 3, 4]]\nlabels: [x]\n",
                      "6.yml": "", "7.JPEG": None, "8.orphan": good})
    with pytest.raises(ValueError) as refused:
        course_split(tmp_path, "training")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'training'}: 5 files with problems that training does not repair:")
    for kind, names in [("length mismatch: 2 files", ["2.yml", "4.yml"]), ("unknown class: 1 file", ["5.yml"]),
                        ("empty label file: 1 file", ["6.yml"]), ("image without label file: 1 file", ["7.JPEG"])]:
        assert kind in message
        assert all(name in message for name in names)
    assert "8.yml" not in message  # a label without its image is ignored, not refused
    assert "python -m demo.check" in message


def test_repairs_are_summarised_and_strict_labels_refuses_them(tmp_path, caplog):
    _split(tmp_path, {"1.yml": "bboxes: [[-4, 2, 30, 40], [70, 1, 80, 9]]\nlabels: [dog, zebra]\n",
                      "2.yml": "bboxes: []\nlabels: []\n"})
    with caplog.at_level(logging.WARNING):
        ds = course_split(tmp_path, "training")
    assert [s.boxes for s in ds.samples] == [((0.0, 2.0, 30.0, 40.0),), ()]  # 2 is a background image
    assert [a["bbox"] for a in ds.coco_ground_truth()["annotations"]] == [[0.0, 2.0, 30.0, 38.0]]
    assert "box outside the image (clamped): 1 file" in caplog.text
    assert "box without area (dropped): 1 file" in caplog.text
    with pytest.raises(ValueError, match="refuses under --strict-labels:\n  box outside the image"):
        course_split(tmp_path, "training", strict=True)


def test_split_numbering_comes_from_the_files(tmp_path):
    for n in (30001, 30002, 30010):
        (tmp_path / "validation" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validation" / "labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validation" / "images" / f"{n}.JPEG").write_bytes(b"")
        (tmp_path / "validation" / "labels" / f"{n}.yml").write_text("bboxes: []\nlabels: []\n")
    assert [img.stem for img, _ in list_split(tmp_path, "validation")] == ["30001", "30002", "30010"]
    (tmp_path / "validation" / "images" / "30011.JPEG").write_bytes(b"")
    (tmp_path / "validation" / "images" / "030001.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="do not pair up") as refused:
        list_split(tmp_path, "validation")
    assert "image without label file: 1 file" in str(refused.value) and "30011.JPEG" in str(refused.value)
    assert "duplicate image id: 1 file" in str(refused.value) and "030001.JPEG: 30001, as 30001.JPEG" in str(
        refused.value)
    _, problems = scan_split(tmp_path, "validation")
    assert "label file without image" not in summary(problems)  # 030001's label is 30001's
