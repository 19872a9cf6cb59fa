"""Labeled detection data: the course layout or a COCO annotation file, behind one dataset class.

- Course: ``<root>/<split>/images/N.JPEG`` with ``<root>/<split>/labels/N.yml`` (see ``moco.course``). Category
  ids are the course index + 1, so ids run 1..100 over the course's 100 names and 0 stays the background.
- COCO: ``<root>/annotations/instances_<split>.json`` with images under ``<root>/<split>/``.

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

from moco.course import CLASSES, list_split, read_label_file
from moco.images import image_size, load_rgb
from moco.unreadable import first_readable


@dataclass(frozen=True)
class Sample:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # xmin, ymin, xmax, ymax in pixels
    category_ids: tuple[int, ...]


class DetectionSet(torch.utils.data.Dataset):
    """Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` and a dict with ``boxes``
    (``tv_tensors.BoundingBoxes``, XYXY), ``labels`` (int64, 1..C) and ``image_id``."""

    def __init__(self, samples: list[Sample], categories: dict[int, str], transforms=None, source: str = ""):
        self.samples = samples
        self.categories = dict(sorted(categories.items()))
        self.transforms = transforms
        self.source = source
        self.label_to_category = {label: cat for label, cat in enumerate(self.categories, start=1)}
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
    moco.unreadable). Never for validation or evaluation, whose score a replaced image would change unseen."""

    def __init__(self, dataset: DetectionSet, max_unreadable: int):
        self.dataset, self.max_unreadable = dataset, max_unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        (image, target), failed, error = first_readable(self.dataset.__getitem__, index, len(self.dataset),
                                                        self.max_unreadable)
        return image, target, failed, error


def course_split(root: str | Path, split: str, transforms=None) -> DetectionSet:
    """A course split; image ids are the numbers in the file names, so ids are stable across splits."""
    category_of = {name: index + 1 for index, name in enumerate(CLASSES)}
    samples = []
    for image_path, label_path in list_split(root, split):
        if not image_path.stem.isdigit():
            raise ValueError(f"{image_path}: course images are named N.JPEG with N a number")
        boxes, names = read_label_file(label_path)
        unknown = sorted(set(names) - category_of.keys())
        if unknown:
            raise ValueError(f"{label_path}: unknown class name(s) {unknown}; see moco/course_classes.txt")
        width, height = image_size(image_path)
        samples.append(Sample(int(image_path.stem), image_path, width, height,
                              tuple(tuple(b) for b in boxes), tuple(category_of[n] for n in names)))
    return DetectionSet(samples, {index + 1: name for index, name in enumerate(CLASSES)}, transforms,
                        source=f"{Path(root) / split}")


def coco_split(annotation_file: str | Path, image_dir: str | Path, transforms=None) -> DetectionSet:
    """A COCO instances file; crowd regions and boxes without area are left out of training targets."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        data = json.loads(annotation_file.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        per_image: dict[int, list[dict]] = {int(im["id"]): [] for im in data["images"]}
        for ann in data.get("annotations", []):
            per_image[int(ann["image_id"])].append(ann)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{annotation_file}: not a COCO instances file: {exc}") from exc
    samples = []
    for im in sorted(data["images"], key=lambda im: int(im["id"])):
        path = image_dir / im["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {annotation_file} but missing")
        boxes, cats = [], []
        for ann in per_image[int(im["id"])]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            if int(ann["category_id"]) not in categories:
                raise ValueError(f"{annotation_file}: annotation {ann.get('id')} has unknown category "
                                 f"{ann['category_id']}")
            boxes.append((x, y, x + w, y + h))
            cats.append(int(ann["category_id"]))
        width, height = (int(im["width"]), int(im["height"])) if "width" in im else image_size(path)
        samples.append(Sample(int(im["id"]), path, width, height, tuple(boxes), tuple(cats)))
    return DetectionSet(samples, categories, transforms, source=str(annotation_file))


def load_split(root: str | Path, split: str, transforms=None) -> DetectionSet:
    """Whichever layout ``root`` has for ``split``: the course's label folders or a COCO annotation file."""
    root = Path(root)
    coco_file = root / "annotations" / f"instances_{split}.json"
    if (root / split / "labels").is_dir():
        return course_split(root, split, transforms)
    if coco_file.is_file():
        return coco_split(coco_file, root / split, transforms)
    raise FileNotFoundError(f"{root}: no split {split!r}: expected {root / split}/images + labels (course layout) "
                            f"or {coco_file} (COCO layout)")


def collate(batch):
    return tuple(zip(*batch))
