"""The course dataset's labeled layout: class names, label files and the pairing of images with labels.

A split lives at ``<root>/<split>/images/N.JPEG`` with ``<root>/<split>/labels/N.yml``; each YAML holds
``bboxes`` (``[xmin, ymin, xmax, ymax]`` in pixels) and ``labels`` (course class names, same length); some editions
also carry ``image_size``, which is not required. Problems are collected, never raised one at a time (see
``moco.course.labels``).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .images import is_image, number_key
from .labels import Problem, errors, is_box, summary

# libyaml's safe loader when PyYAML was built with it: 7x faster a file (64 vs 451 µs, measured on the tiny set).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The course loader's order: line i is index i. Index 0 ('cup or mug') is the background-label trap.
CLASSES: tuple[str, ...] = tuple(
    line.strip()
    for line in (Path(__file__).with_name("course_classes.txt")).read_text().splitlines()
    if line.strip()
)
_KNOWN = frozenset(CLASSES)


def parse_label_file(path: str | Path) -> tuple[list[list[float]], list[str], list[Problem]]:
    """Boxes and class names of one label file, read with the safe YAML loader, and every problem found in it.
    With an error the boxes and names are empty; box geometry against the image is ``labels.fit_boxes``' job."""
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.load(text, Loader=_SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [], [], [Problem(path, "YAML that does not parse", " ".join(str(exc).split()))]
    if not text.strip():
        return [], [], [Problem(path, "empty label file")]
    if not isinstance(data, dict) or "bboxes" not in data or "labels" not in data:
        found = f"keys {sorted(map(str, data))}" if isinstance(data, dict) else f"a {type(data).__name__}"
        return [], [], [Problem(path, "label file without bboxes/labels", f"found {found}")]
    boxes, names = data["bboxes"] or [], data["labels"] or []
    if not isinstance(boxes, list) or not isinstance(names, list):
        return [], [], [Problem(path, "label file without bboxes/labels", "bboxes and labels must be lists")]
    problems = []
    if len(boxes) != len(names):
        problems.append(Problem(path, "length mismatch", f"{len(boxes)} bboxes but {len(names)} labels"))
    problems += [Problem(path, "malformed box", f"bbox {i} {box!r} is not [xmin, ymin, xmax, ymax]")
                 for i, box in enumerate(boxes) if not is_box(box)]
    unknown = sorted({str(n) for n in names} - _KNOWN)
    if unknown:
        problems.append(Problem(path, "unknown class",
                                f"{unknown}; the course's names are in moco/course/course_classes.txt"))
    if problems:
        return [], [], problems
    return [[float(v) for v in box] for box in boxes], [str(n) for n in names], []


def read_label_file(path: str | Path) -> tuple[list[list[float]], list[str]]:
    """Boxes and names of one label file; its errors raise one ValueError naming the file."""
    boxes, names, problems = parse_label_file(path)
    if problems:
        raise ValueError("; ".join(f"{p} ({p.kind})" for p in problems))
    return boxes, names


def scan_split(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], list[Problem]]:
    """(image, label) pairs of one split ordered by image number, and the pairing's problems: images without a
    label file, label files without an image, names that are not numbers, two files with one number."""
    split_dir = Path(root) / split
    images_dir, labels_dir = split_dir / "images", split_dir / "labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing; expected <root>/{split}/images and <root>/{split}/labels")
    pairs, problems, owner = [], [], {}
    # One listing instead of a stat per image: 30,000 stats are slow on a shared filesystem.
    labels = {p.name: p for p in labels_dir.glob("*.yml")}
    # Ties on the number (7.JPEG, 07.JPEG) in a fixed order, the canonical name first.
    images = sorted((p for p in images_dir.iterdir() if is_image(p.name)), key=lambda p: (number_key(p), len(p.name),
                                                                                          p.name))
    for image in images:
        label = labels_dir / f"{image.stem}.yml"
        if not image.stem.isdigit():
            problems.append(Problem(image, "image not named N.JPEG", "course image ids are the numbers in the names"))
        elif int(image.stem) in owner:
            problems.append(Problem(image, "duplicate image id", f"{int(image.stem)}, as {owner[int(image.stem)]}"))
        elif label.name not in labels:
            problems.append(Problem(image, "image without label file", f"expected {label}"))
        else:
            owner[int(image.stem)] = image.name
            pairs.append((image, label))
    # A label whose image has a problem of its own above is not reported again.
    accounted = {label.name for _, label in pairs} | {f"{p.path.stem}.yml" for p in problems}
    problems += [Problem(label, "label file without image (ignored)")
                 for name, label in sorted(labels.items(), key=lambda item: number_key(item[1]))
                 if name not in accounted]
    return pairs, problems


def list_split(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of one split, ordered by image number; pairing errors raise, all of them at once."""
    pairs, problems = scan_split(root, split)
    refused = errors(problems)
    if refused:
        raise ValueError(f"{Path(root) / split}: the images and label files do not pair up:\n{summary(refused)}")
    if not pairs:
        raise FileNotFoundError(f"{Path(root) / split / 'images'}: no images")
    return pairs
