"""python -m demo.check: every bad file of a dataset in one run, by kind, with the exit status, the boxes per class
and a JSON report that says the same."""
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from demo import check


def _image(path: Path, mode: str = "RGB", size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, np.uint16)).save(path, format="PNG")
    else:
        Image.new(mode, size).save(path, format="JPEG" if path.suffix == ".JPEG" else "PNG")
    return path


def _truncated(path: Path) -> Path:
    """A file whose header reads but whose pixels stop half-way: only a full decode finds it."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        path, format="JPEG" if path.suffix == ".JPEG" else "PNG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _split(root: Path, split: str, labels: dict[str, str | None], images: list[str]) -> Path:
    """A course split: N.yml for each label (None: no file), N.JPEG for each image."""
    for name in images:
        _image(root / split / "images" / name)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        if text is not None:
            (root / split / "labels" / f"{stem}.yml").write_text(text)
    return root / split


def run(capsys, *argv) -> tuple[int, str, dict]:
    out_file = Path(argv[0]).parent / "report.json"
    status = check.main([*map(str, argv), "--workers", "2", "--json", str(out_file)])
    return status, capsys.readouterr().out, json.loads(out_file.read_text())


def kinds_in_text(text: str) -> dict[str, str]:
    """The report's kind lines: kind -> count as printed."""
    return dict(re.findall(r"^  ([^ ].*?): (\d+ (?:files?|in \d+ files?))$", text, re.M))


def test_every_bad_file_of_a_dataset_in_one_run(tmp_path, capsys):
    unlabeled = tmp_path / "train" / "unlabeled"
    for n in range(1, 4):
        _image(unlabeled / f"{n}.PNG")
    _truncated(unlabeled / "4.PNG")
    (unlabeled / "5.PNG").write_bytes(b"")
    (unlabeled / "6.PNG").write_text("not an image\n")
    _image(unlabeled / "7.PNG", "I;16")
    _image(unlabeled / "8.PNG", "P")
    _image(unlabeled / "9.PNG", "RGBA")

    root = tmp_path / "labeled"
    good = "bboxes: [[1, 2, 20, 20], [3, 3, 9, 9]]\nlabels: [dog, dog]\n"
    bad = {
        "2": "bboxes: [[1, 2\nlabels: x", "3": "boxes: []\nlabels: []\n", "4": "bboxes: [[1, 2, 3, 4]]\nlabels: []\n",
        "5": "bboxes: [[1, 2, 3, 4]]\nlabels: [dgo]\n", "6": "bboxes: [[1, 2, 3]]\nlabels: [dog]\n", "7": "",
    }
    _split(root, "training", {
        "1": good, **bad,
        "8": "bboxes: [[-4, 2, 20, 30], [5, 5, 5, 9]]\nlabels: [dog, bird]\n",  # clamped, dropped
        "9": "bboxes: []\nlabels: []\n",  # a background image: no problem
        "11": good,  # no image
        "12": good,  # its image is truncated
    }, images=[f"{n}.JPEG" for n in range(1, 11)] + ["09.JPEG"])
    _truncated(root / "training" / "images" / "12.JPEG")
    _split(root, "validation", {"20": "bboxes: [[0, 0, 8, 8]]\nlabels: [zebra]\n"}, images=["20.JPEG"])

    status, text, report = run(capsys, tmp_path / "train", root)

    assert status == 1
    train = root / "training"
    expected = {
        "unreadable image": {unlabeled / "4.PNG", unlabeled / "6.PNG", train / "images/12.JPEG"},
        "empty image file": {unlabeled / "5.PNG"},
        "16/32-bit greyscale (scaled to 8 bits)": {unlabeled / "7.PNG"},
        "palette image (converted to RGB)": {unlabeled / "8.PNG"},
        "transparency (composited on white)": {unlabeled / "9.PNG"},
        "YAML that does not parse": {train / "labels/2.yml"},
        "label file without bboxes/labels": {train / "labels/3.yml"},
        "length mismatch": {train / "labels/4.yml"},
        "unknown class": {train / "labels/5.yml"},
        "malformed box": {train / "labels/6.yml"},
        "empty label file": {train / "labels/7.yml"},
        "box outside the image (clamped)": {train / "labels/8.yml"},
        "box without area (dropped)": {train / "labels/8.yml"},
        "image without label file": {train / "images/10.JPEG"},
        "label file without image (ignored)": {train / "labels/11.yml"},
        "duplicate image id": {train / "images/09.JPEG"},
    }
    found = {}
    for p in report["problems"]:
        found.setdefault(p["kind"], set()).add(Path(p["path"]))
    assert found == expected
    assert kinds_in_text(text) == {kind: f"{len(paths)} file{'s' * (len(paths) > 1)}"
                                   for kind, paths in expected.items()}
    assert report["kinds"] == {kind: len(paths) for kind, paths in expected.items()}
    for path in set().union(*expected.values()):
        assert str(path) in text
    errors = [p for p in report["problems"] if p["error"]]
    assert report["errors"] == len(errors) == 12 and report["error_files"] == 12 and report["exit_status"] == 1
    assert "12 errors in 12 files, 6 warnings" in text.splitlines()[-1]
    assert report["images"] == {"unlabeled": 9, "labeled": 13}

    # Boxes after the repairs: two dogs each in 1 and 12 (whose pixels are broken, not its label), 8's clamped
    # one; zebra is in validation alone.
    assert (report["classes"]["training"]["dog"], report["classes"]["training"]["zebra"]) == (5, 0)
    assert (report["classes"]["validation"]["dog"], report["classes"]["validation"]["zebra"]) == (0, 1)
    assert re.search(r"^  dog +5 +0$", text, re.M)
    assert re.search(r"^  zebra +0 +1  <- no box in training$", text, re.M)
    assert re.search(r"^  no box in any split: 98 of the 100 classes", text, re.M)

    # --limit: one line a kind, the rest counted.
    check.main([str(tmp_path / "train"), "--limit", "1", "--workers", "1"])
    limited = capsys.readouterr().out
    assert "    ... and 1 more" in limited and str(unlabeled / "6.PNG") not in limited


def test_coco_missing_image_and_unknown_category(tmp_path, capsys):
    _image(tmp_path / "val" / "a.jpg")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
        "categories": [{"id": 3, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]}]}))
    status, text, report = run(capsys, tmp_path)
    assert status == 1
    assert {(p["kind"], Path(p["path"]).name) for p in report["problems"]} == {
        ("listed image missing", "gone.jpg"), ("unknown class", "a.jpg")}
    assert "labeled, split val" in text and report["classes"] == {"val": {"car": 0}}


def test_the_tiny_set_is_clean(tiny_data, capsys):
    status, text, report = run(capsys, tiny_data / "train", tiny_data / "labeled")
    assert status == 0 and report["problems"] == [] and "problems: none" in text
    assert report["images"] == {"unlabeled": 256, "labeled": 64}
    boxes = {split: Counter() for split in ("training", "validation")}
    for split, counter in boxes.items():
        for label in (tiny_data / "labeled" / split / "labels").glob("*.yml"):
            counter.update(yaml.safe_load(label.read_text())["labels"])
    assert {split: {n: c for n, c in counts.items() if c} for split, counts in report["classes"].items()} == boxes
    assert re.search(r"checked 320 images \(256 unlabeled, 64 labeled in 2 splits\) in [\d.]+ s, \d+ images/s with "
                     r"2 workers: no errors, 0 warnings$", text)


def test_notes_and_repairs_pass_and_strict_labels_refuses_the_repairs(tmp_path, capsys):
    _image(tmp_path / "unlabeled" / "1.PNG", "P")
    _split(tmp_path / "labeled", "training", {"1": "bboxes: [[-1, 0, 9, 9]]\nlabels: [dog]\n"}, ["1.JPEG"])
    argv = [tmp_path / "unlabeled", tmp_path / "labeled"]
    status, _, report = run(capsys, *argv)
    assert status == 0 and report["kinds"] == {"palette image (converted to RGB)": 1,
                                                "box outside the image (clamped)": 1}
    status, _, report = run(capsys, *argv, "--strict-labels")
    assert status == 1 and [p["kind"] for p in report["problems"] if p["error"]] == ["box outside the image (clamped)"]


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere: no such directory"),
    (["empty"], "empty: neither unlabeled images"),
    (["labeled", "--splits", "test"], "labeled: no split test (it has training)"),
    (["labeled", "--workers", "0"], "--workers 0: at least 1"),
    (["partial"], "partial/test: has images/ but no labels/ (--splits names the splits to check)"),
])
def test_usage_errors_exit_2(tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial" / "test" / "images").mkdir(parents=True)
    _split(tmp_path / "labeled", "training", {}, [])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        check.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_progress_is_plain_lines_in_a_log(monkeypatch):
    monkeypatch.setattr(check, "_LOG_EVERY", 0.01)
    stream = io.StringIO()
    with check.Progress(10, stream) as progress:
        progress.add(3)
        while "decoded 3/10" not in stream.getvalue():
            pass
    assert re.match(r"decoded 3/10 images, \d+ images/s, about \d+ s left\n", stream.getvalue().splitlines(True)[-1])
