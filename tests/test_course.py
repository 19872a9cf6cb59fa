import pytest

from moco.course import CLASSES, list_split, read_label_file


def test_course_classes_in_loader_order():
    assert len(CLASSES) == 100 and len(set(CLASSES)) == 100
    assert CLASSES[0] == "cup or mug"


def test_label_file_round_trip(tmp_path):
    path = tmp_path / "1.yml"
    path.write_text("bboxes:\n- [1, 2, 30, 40]\nlabels:\n- cup or mug\nimage_size: [64, 64]\n")
    assert read_label_file(path) == ([[1.0, 2.0, 30.0, 40.0]], ["cup or mug"])


@pytest.mark.parametrize("text, problem", [
    ("bboxes: [[1, 2, 3, 4]]\nlabels: []\n", "1 bboxes but 0 labels"),
    ("bboxes: [[5, 2, 3, 4]]\nlabels: [dog]\n", "has no area"),
    ("bboxes: [[1, 2, 3]]\nlabels: [dog]\n", "is not \\[xmin, ymin, xmax, ymax\\]"),
    ("just text", "must be a mapping"),
    # The original parsed labels with a loader that builds arbitrary Python objects.
    ("bboxes: !!python/object/apply:os.system ['echo hacked']\nlabels: []\n", "cannot read label file"),
])
def test_bad_label_file_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "7.yml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"7.yml: .*{problem}"):
        read_label_file(path)


def test_split_numbering_comes_from_the_files(tmp_path):
    for n in (30001, 30002, 30010):
        (tmp_path / "validation" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validation" / "labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validation" / "images" / f"{n}.JPEG").write_bytes(b"")
        (tmp_path / "validation" / "labels" / f"{n}.yml").write_text("bboxes: []\nlabels: []\n")
    assert [img.stem for img, _ in list_split(tmp_path, "validation")] == ["30001", "30002", "30010"]
    (tmp_path / "validation" / "images" / "30011.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="30011.JPEG: no label file"):
        list_split(tmp_path, "validation")
