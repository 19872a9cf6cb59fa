"""Labeled detection data: the course layout or a COCO annotation file, behind one dataset class.

- Course: ``<root>/<split>/images/N.JPEG`` with ``<root>/<split>/labels/N.yml`` (see ``moco.course.layout``). Category
  ids are the course index + 1, so ids run 1..100 over the course's 100 names and 0 stays the background.
- COCO: ``<root>/annotations/instances_<split>.json`` with images under ``<root>/<split>/``.

Boxes are clamped to their image and boxes left without area dropped when the split is loaded, so the training
targets and evaluation's ground truth are the same boxes; the other problems stop the load, all listed at once
(see ``moco.course.labels``). Images without boxes are background images.

The model sees contiguous labels 1..C (0 is background); ``DetectionSet.label_to_category`` maps them back
to the dataset's category ids and names for results, logs and evaluation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from moco.course.images import UnreadableImage, image_size, load_rgb
from moco.course.labels import Problem, errors, fit_boxes, is_box, plural, summary
from moco.course.layout import CLASSES, parse_label_file, scan_split
from moco.runtime.logger import get_logger
from moco.runtime.unreadable import first_readable

log = get_logger(__name__)


@dataclass(frozen=True)
class Sample:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # xmin, ymin, xmax, ymax in pixels
    category_ids: tuple[int, ...]


def label_to_category(categories: dict[int, str]) -> dict[int, int]:
    """The model's labels 1..C for the dataset's category ids, in id order: a checkpoint's categories give back the
    numbering it was trained with (demo.predict has no dataset to ask)."""
    return {label: cat for label, cat in enumerate(sorted(categories), start=1)}


class DetectionSet(torch.utils.data.Dataset):
    """Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` and a dict with ``boxes``
    (``tv_tensors.BoundingBoxes``, XYXY), ``labels`` (int64, 1..C) and ``image_id``."""

    def __init__(self, samples: list[Sample], categories: dict[int, str], transforms=None, source: str = "",
                 problems: list[Problem] = ()):
        self.samples = samples
        self.problems = list(problems)  # found while loading, repairs included (see moco.course.labels)
        self.categories = dict(sorted(categories.items()))
        self.transforms = transforms
        self.source = source
        self.label_to_category = label_to_category(self.categories)
        self._category_to_label = {cat: label for label, cat in self.label_to_category.items()}

    @property
    def num_classes(self) -> int:
        """Outputs of the box predictor, background included."""
        return len(self.categories) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = tv_tensors.Image(TF.pil_to_tensor(load_rgb(sample.path)))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                canvas_size=(sample.height, sample.width),
            ),
            "labels": torch.tensor([self._category_to_label[c] for c in sample.category_ids], dtype=torch.int64),
            "image_id": sample.image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def aspect_ratios(self) -> list[float]:
        return [s.width / s.height for s in self.samples]

    def coco_ground_truth(self) -> dict:
        """The split as a COCO ground-truth dict, box area as the annotation area."""
        images, annotations = [], []
        for s in self.samples:
            images.append({"id": s.image_id, "file_name": s.path.name, "width": s.width, "height": s.height})
            for (x0, y0, x1, y1), cat in zip(s.boxes, s.category_ids):
                w, h = x1 - x0, y1 - y0
                annotations.append({"id": len(annotations) + 1, "image_id": s.image_id, "category_id": cat,
                                    "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        categories = [{"id": cat, "name": name} for cat, name in self.categories.items()]
        return {"images": images, "annotations": annotations, "categories": categories}


class ReplacingUnreadable(torch.utils.data.Dataset):
    """Training items of ``dataset`` as ``(image, target, failed, error)``: a sample whose image cannot be decoded
    is replaced by the next readable one, ``failed`` is its index (-1: none) and ``error`` why (see
    moco.runtime.unreadable). Never for validation or evaluation, whose score a replaced image would change unseen."""

    def __init__(self, dataset: DetectionSet, max_unreadable: int):
        self.dataset, self.max_unreadable = dataset, max_unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        (image, target), failed, error = first_readable(self.dataset.__getitem__, index, len(self.dataset),
                                                        self.max_unreadable)
        return image, target, failed, error


def course_split(root: str | Path, split: str, transforms=None, strict: bool = False) -> DetectionSet:
    """A course split; image ids are the numbers in the file names, so ids are stable across splits."""
    return _checked(_course_set(root, split, transforms), strict)


def _course_set(root: str | Path, split: str, transforms=None) -> DetectionSet:
    category_of = {name: index + 1 for index, name in enumerate(CLASSES)}
    pairs, problems = scan_split(root, split)
    samples = []
    for image_path, label_path in pairs:
        boxes, names, found = parse_label_file(label_path)
        size = _header_size(image_path, found)
        problems += found
        if found:
            continue
        kept, fitted, repairs = fit_boxes(label_path, boxes, *size)
        problems += repairs
        samples.append(Sample(int(image_path.stem), image_path, *size, tuple(map(tuple, fitted)),
                              tuple(category_of[names[i]] for i in kept)))
    return DetectionSet(samples, {index + 1: name for index, name in enumerate(CLASSES)}, transforms,
                        source=f"{Path(root) / split}", problems=problems)


def _coco_set(annotation_file: str | Path, image_dir: str | Path, transforms=None) -> DetectionSet:
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        data = json.loads(annotation_file.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {}
        for im in data["images"]:
            images.setdefault(int(im["id"]), []).append(im)
        per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
        for ann in data.get("annotations", []):
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{annotation_file}: not a COCO instances file: {exc}") from exc
    samples, problems = [], []
    for image_id in sorted(per_image):
        if image_id not in images:
            problems.append(Problem(annotation_file, "listed image missing",
                                    f"annotations refer to image id {image_id}, which is not in 'images'"))
            continue
        im, *others = images[image_id]
        path = image_dir / im["file_name"]
        problems += [Problem(image_dir / o["file_name"], "duplicate image id", f"{image_id}, as {im['file_name']}")
                     for o in others]
        if not path.is_file():
            problems.append(Problem(path, "listed image missing", f"listed in {annotation_file.name}"))
            continue
        boxes, cats, found = [], [], []
        for ann in per_image[image_id]:
            if ann.get("iscrowd", 0):
                continue
            if not is_box(ann.get("bbox")):
                found.append(Problem(path, "malformed box", f"annotation {ann.get('id')}: bbox {ann.get('bbox')!r} "
                                                            f"is not [x, y, width, height]"))
            elif int(ann.get("category_id", -1)) not in categories:
                found.append(Problem(path, "unknown class", f"annotation {ann.get('id')}: category "
                                                            f"{ann.get('category_id')!r} is not in 'categories'"))
            else:
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes.append((x, y, x + w, y + h))
                cats.append(int(ann["category_id"]))
        size = (int(im["width"]), int(im["height"])) if "width" in im else _header_size(path, found)
        problems += found
        if found:
            continue
        kept, fitted, repairs = fit_boxes(path, boxes, *size)
        problems += repairs
        samples.append(Sample(image_id, path, *size, tuple(map(tuple, fitted)), tuple(cats[i] for i in kept)))
    return DetectionSet(samples, categories, transforms, source=str(annotation_file), problems=problems)


def _header_size(path: Path, problems: list[Problem]) -> tuple[int, int]:
    """The image's size from its header; an unreadable header is recorded in ``problems``."""
    try:
        return image_size(path)
    except UnreadableImage as exc:
        problems.append(Problem(path, "unreadable image", str(exc).removeprefix(f"{path}: ")))
        return 0, 0


def _checked(dataset: DetectionSet, strict: bool) -> DetectionSet:
    """Refuse the split with every error listed at once (``strict``: the repairs too); else summarise the repairs."""
    refused = errors(dataset.problems, strict)
    if refused:
        files = plural(len({p.path for p in refused}), "file")
        raise ValueError(f"{dataset.source}: {files} with problems that training "
                         f"{'does not repair' if not strict else 'refuses under --strict-labels'}:\n"
                         f"{summary(refused)}\n(python -m demo.check checks a whole dataset in one pass)")
    if not dataset.samples:
        raise FileNotFoundError(f"{dataset.source}: no images")
    if dataset.problems:  # none refused: repairs and ignored files only
        log.warning("%s: label problems repaired (see 'Bad data' in the README; --strict-labels refuses them):\n%s",
                    dataset.source, summary(dataset.problems, limit=5))
    return dataset


def load_split(root: str | Path, split: str, transforms=None, strict: bool = False) -> DetectionSet:
    """Whichever layout ``root`` has for ``split``: the course's label folders or a COCO annotation file. Label
    problems follow ``moco.course.labels``' policy: every error listed at once, repairs summarised."""
    return _checked(read_split(root, split, transforms), strict)


def read_split(root: str | Path, split: str, transforms=None) -> DetectionSet:
    """``load_split`` without the refusal: every problem found, errors included, is on ``.problems`` (for
    ``demo.check``); a COCO file that does not parse still raises ValueError."""
    root = Path(root)
    coco_file = root / "annotations" / f"instances_{split}.json"
    if (root / split / "labels").is_dir():
        return _course_set(root, split, transforms)
    if coco_file.is_file():
        return _coco_set(coco_file, root / split, transforms)
    raise FileNotFoundError(f"{root}: no split {split!r}: expected {root / split}/images + labels (course layout) "
                            f"or {coco_file} (COCO layout)")


def collate(batch):
    return tuple(zip(*batch))
