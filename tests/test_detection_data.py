import json

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from demo.datasets import collate, course_split, load_split
from demo.sampler import GroupedBatchSampler, aspect_group, eval_batches
from demo.transforms import train_transforms
from moco.course.layout import CLASSES


def test_course_split_ids_labels_and_names(tiny_data):
    ds = course_split(tiny_data / "labeled", "validation")
    ids = [s.image_id for s in ds.samples]
    files = sorted(int(p.stem) for p in (tiny_data / "labeled/validation/images").iterdir())
    assert ids == files  # numbering from the files, not from a hard-coded offset
    assert ds.num_classes == 101 and len(ds.categories) == 100
    assert ds.categories[1] == "cup or mug" and ds.categories[100] == CLASSES[99]
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].canvas_size == tuple(image.shape[-2:])
    assert target["labels"].min() >= 1 and target["labels"].max() <= 100
    assert target["image_id"] == ids[0]


def test_unknown_class_name_names_the_file(tmp_path):
    (tmp_path / "training/images").mkdir(parents=True)
    (tmp_path / "training/labels").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "training/images/1.JPEG")
    (tmp_path / "training/labels/1.yml").write_text("bboxes: [[1, 2, 10, 12]]\nlabels: [unicorn]\n")
    with pytest.raises(ValueError, match=r"1\.yml.*unicorn"):
        course_split(tmp_path, "training")


def test_horizontal_flip_moves_boxes_with_the_image():
    image = tv_tensors.Image(torch.zeros(3, 20, 50, dtype=torch.uint8))
    image[:, 2:8, 5:15] = 255
    boxes = tv_tensors.BoundingBoxes([[5.0, 2.0, 15.0, 8.0]], format="XYXY", canvas_size=(20, 50))
    flipped, target = train_transforms(hflip=1.0)(image, {"boxes": boxes, "labels": torch.tensor([3])})
    assert target["boxes"].tolist() == [[35.0, 2.0, 45.0, 8.0]]
    assert flipped[0, 2:8, 35:45].eq(255).all() and flipped[0].sum() == image[0].sum()


def test_degenerate_boxes_are_removed_with_their_labels():
    image = tv_tensors.Image(torch.zeros(3, 20, 50, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[5.0, 2.0, 15.0, 8.0], [60.0, 2.0, 70.0, 8.0], [3.0, 4.0, 3.5, 9.0]],
                                     format="XYXY", canvas_size=(20, 50))  # inside; off the image; too thin
    _, target = train_transforms(hflip=0.0)(image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3])})
    assert target["boxes"].tolist() == [[5.0, 2.0, 15.0, 8.0]]
    assert target["labels"].tolist() == [1]


def test_coco_layout_maps_sparse_category_ids(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "val/a.jpg")
    Image.new("RGB", (32, 48)).save(tmp_path / "val/b.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 9, "file_name": "b.jpg", "width": 32, "height": 48}],
        "categories": [{"id": 90, "name": "toaster"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [5, 5, 4, 4], "area": 16, "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0},
        ],
    }
    (tmp_path / "annotations/instances_val.json").write_text(json.dumps(coco))
    ds = load_split(tmp_path, "val")
    assert ds.num_classes == 3 and ds.label_to_category == {1: 3, 2: 90}
    _, target = ds[0]
    assert target["image_id"] == 7 and target["labels"].tolist() == [2]  # the crowd box is not a target
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 22.0]]
    assert ds.aspect_ratios() == [64 / 48, 32 / 48]


def test_missing_split_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="course layout.*COCO layout"):
        load_split(tmp_path, "validation")


def test_collate_keeps_variable_sizes(tiny_data):
    ds = course_split(tiny_data / "labeled", "validation")
    items = [ds[i] for i in range(len(ds))]
    sizes = {tuple(image.shape) for image, _ in items}
    assert len(sizes) > 1  # the tiny set's images differ in size, as the course's do
    images, targets = collate(items)
    assert [tuple(i.shape) for i in images] == [tuple(image.shape) for image, _ in items]
    assert [t["image_id"] for t in targets] == [s.image_id for s in ds.samples]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_grouped_batches_cover_every_image_with_equal_counts(world_size):
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 1.3, 1.1, 0.6, 2.0, 0.9]
    samplers = [GroupedBatchSampler(ratios, 2, rank, world_size, seed=1) for rank in range(world_size)]
    batches = [list(s) for s in samplers]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(samplers[0])
    seen = [i for rank in batches for batch in rank for i in batch]
    assert set(seen) == set(range(len(ratios)))
    mixed = sum(len({aspect_group(ratios[i]) for i in batch}) > 1 for rank in batches for batch in rank)
    assert mixed <= world_size  # at most the one leftover batch per rank mixes orientations
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != batches[0]  # reshuffled each epoch


def test_eval_batches_do_not_depend_on_world_size():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 1.3]
    single = eval_batches(ratios, 2)
    for world_size in (2, 3):
        shards = [eval_batches(ratios, 2, rank, world_size) for rank in range(world_size)]
        assert sorted(b for shard in shards for b in shard) == sorted(single)
