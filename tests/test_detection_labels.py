"""Detection targets against the label files themselves, the training sampler's mid-epoch skip, and the recipe's
learning rates, with expected values written out here rather than taken from the code under test."""
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from demo.datasets import course_split, load_split
from demo.recipe import PROTOCOLS, STAGES, multiscale_sizes, scaled_lr, warmup_factor
from demo.sampler import GroupedBatchSampler
from demo.transforms import train_transforms
from moco.runtime.failures import UsageError

CLASS_FILE = Path(__file__).resolve().parents[1] / "moco" / "course" / "course_classes.txt"
COURSE_NAMES = [line.strip() for line in CLASS_FILE.read_text().splitlines() if line.strip()]


def test_targets_and_ground_truth_hold_the_label_files_boxes(tiny_data):
    root = tiny_data / "labeled"
    ds = course_split(root, "validation")
    gt = ds.coco_ground_truth()
    checked = 0
    for index, sample in enumerate(ds.samples):
        label = yaml.safe_load((root / "validation" / "labels" / f"{sample.image_id}.yml").read_text())
        _, target = ds[index]
        assert target["boxes"].tolist() == [[float(v) for v in box] for box in label["bboxes"]]
        assert target["labels"].tolist() == [COURSE_NAMES.index(name) + 1 for name in label["labels"]]
        anns = [a for a in gt["annotations"] if a["image_id"] == sample.image_id]
        assert [a["bbox"] for a in anns] == [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in label["bboxes"]]
        assert [a["category_id"] for a in anns] == [COURSE_NAMES.index(name) + 1 for name in label["labels"]]
        checked += len(anns)
    assert checked == len(gt["annotations"]) > 16


def test_a_hand_written_split(tmp_path):
    for split_dir in ("images", "labels"):
        (tmp_path / "training" / split_dir).mkdir(parents=True)
    Image.new("RGB", (60, 40)).save(tmp_path / "training/images/12.JPEG")
    Image.new("RGB", (30, 50)).save(tmp_path / "training/images/3.JPEG")
    (tmp_path / "training/labels/12.yml").write_text(
        "bboxes: [[2, 5, 12, 35], [40, 1, 58, 9]]\nlabels: [cup or mug, zebra]\n")
    (tmp_path / "training/labels/3.yml").write_text("bboxes: [[1.5, 2, 4, 30]]\nlabels: [dog]\n")
    ds = course_split(tmp_path, "training")
    cup, zebra, dog = (COURSE_NAMES.index(n) + 1 for n in ("cup or mug", "zebra", "dog"))
    assert cup == 1
    assert [s.image_id for s in ds.samples] == [3, 12]
    assert [(s.width, s.height) for s in ds.samples] == [(30, 50), (60, 40)]
    image, target = ds[1]
    assert tuple(image.shape) == (3, 40, 60) and target["boxes"].canvas_size == (40, 60)
    assert target["boxes"].tolist() == [[2.0, 5.0, 12.0, 35.0], [40.0, 1.0, 58.0, 9.0]]
    assert target["labels"].tolist() == [cup, zebra] and target["image_id"] == 12
    assert ds.aspect_ratios() == [30 / 50, 60 / 40]
    gt = ds.coco_ground_truth()
    assert gt["images"] == [{"id": 3, "file_name": "3.JPEG", "width": 30, "height": 50},
                            {"id": 12, "file_name": "12.JPEG", "width": 60, "height": 40}]
    assert gt["annotations"] == [
        {"id": 1, "image_id": 3, "category_id": dog, "bbox": [1.5, 2.0, 2.5, 28.0], "area": 70.0, "iscrowd": 0},
        {"id": 2, "image_id": 12, "category_id": cup, "bbox": [2.0, 5.0, 10.0, 30.0], "area": 300.0, "iscrowd": 0},
        {"id": 3, "image_id": 12, "category_id": zebra, "bbox": [40.0, 1.0, 18.0, 8.0], "area": 144.0,
         "iscrowd": 0},
    ]
    assert gt["categories"][0] == {"id": 1, "name": "cup or mug"} and len(gt["categories"]) == 100


def test_course_images_must_be_numbered(tmp_path):
    for split_dir in ("images", "labels"):
        (tmp_path / "training" / split_dir).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "training/images/cat.JPEG")
    (tmp_path / "training/labels/cat.yml").write_text("bboxes: [[1, 1, 4, 4]]\nlabels: [dog]\n")
    with pytest.raises(ValueError,
                       match="image not named N.JPEG: 1 file\n.*cat.JPEG: course image ids are the numbers"):
        course_split(tmp_path, "training")


@pytest.mark.parametrize("skip", [0, 1, 3, 5])
def test_a_resumed_epoch_trains_the_remaining_batches_of_the_same_order(skip):
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 1.3, 1.1, 0.6, 2.0, 0.9]
    full = GroupedBatchSampler(ratios, 2, seed=4)
    full.set_epoch(3)
    order = list(full)
    assert len(order) == len(full) == 6  # ceil(11 / 2)
    resumed = GroupedBatchSampler(ratios, 2, seed=4)
    resumed.set_epoch(3, skip=skip)
    assert list(resumed) == order[skip:]
    assert len(resumed) == 6 - skip


def test_sampler_seed_and_epoch_fix_the_order():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 1.3, 1.1]
    a, b, c = (GroupedBatchSampler(ratios, 2, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b) and list(a) != list(c)
    epoch_orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        epoch_orders.append(list(a))
    assert len({str(o) for o in epoch_orders}) == 3
    a.set_epoch(1)
    assert list(a) == epoch_orders[1]


def test_sampler_pads_shards_and_refuses_too_few_images():
    ratios = [1.0] * 7  # 2 ranks: 4 images each, the first of the permutation repeated
    shards = [list(GroupedBatchSampler(ratios, 2, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 2] and all(len(b) == 2 for s in shards for b in s)
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == 8 and set(seen) == set(range(7))  # one image twice, none left out
    GroupedBatchSampler([1.0] * 4, 2, 1, 2)  # exactly one batch per rank
    with pytest.raises(UsageError, match="3 images cannot fill one batch of 2 on 2 process"):  # exit status 2
        GroupedBatchSampler([1.0] * 3, 2, 0, 2)


def test_recipe_lr_scales_linearly_with_the_total_batch():
    original, moco = PROTOCOLS["original"], PROTOCOLS["moco"]
    assert [scaled_lr(original, STAGES[s], 4) for s in ("r1", "r2", "r3")] == pytest.approx([0.03, 0.003, 0.0003])
    assert [scaled_lr(moco, STAGES[s], 4) for s in ("r1", "r2", "r3")] == pytest.approx([0.01, 0.001, 0.0001])
    assert scaled_lr(original, STAGES["r1"], 16) == pytest.approx(0.12)
    assert scaled_lr(original, STAGES["r2"], 2) == pytest.approx(0.0015)
    assert scaled_lr(moco, STAGES["r3"], 8) == pytest.approx(0.0002)
    assert [STAGES[s].end_epoch for s in ("r1", "r2", "r3")] == [23, 27, 37]
    assert [STAGES[s].previous for s in ("r1", "r2", "r3")] == [None, "r1", "r2"]


def test_protocols_moco_trains_every_normalised_stage_at_many_sizes_and_original_does_not():
    moco, original = PROTOCOLS["moco"], PROTOCOLS["original"]
    assert (moco.norm, moco.trainable_layers, moco.multiscale) == ("sync", 5, True)
    assert (original.norm, original.trainable_layers, original.multiscale) == ("frozen", 3, False)
    assert multiscale_sizes(800) == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)  # MoCo's configs
    assert multiscale_sizes(224) == (160, 192, 224)
    assert multiscale_sizes(50) == (50,)


def test_r1_takes_the_protocol_asked_for_and_later_stages_keep_their_checkpoints():
    from demo import train as demo_train

    def args(*flags):
        return demo_train.get_parser().parse_args(["--stage", "r1", "--dataset-root", "x", "--min-size", "224",
                                                   *flags])

    def config(*flags):
        parsed = args(*flags)
        return demo_train.detector_config(parsed, demo_train.chosen_protocol(parsed, None, None), "resnet18", 11)

    assert (config().norm, config().trainable_layers, config().train_min_sizes) == ("sync", 5, (160, 192, 224))
    original = config("--protocol", "original")
    assert (original.norm, original.trainable_layers, original.train_min_sizes) == ("frozen", 3, ())
    assert config("--protocol", "original", "--norm", "sync").trainable_layers == 5  # sync needs every stage
    assert config("--train-sizes", "200", "224").train_min_sizes == (200, 224)
    assert config("--norm", "frozen").trainable_layers == 5
    assert demo_train.chosen_protocol(args(), {"protocol": "original"}, "r1.pth").name == "original"
    assert demo_train.chosen_protocol(args(), {}, "old.pth").name == "original"  # before protocols: the original's
    with pytest.raises(ValueError, match="r1.pth: trained under --protocol original, which stage r1 continues"):
        demo_train.chosen_protocol(args("--protocol", "moco"), {"protocol": "original"}, "r1.pth")


def test_warmup_rises_linearly_from_a_thousandth_to_one():
    assert warmup_factor(0, 1000) == pytest.approx(0.001)
    assert warmup_factor(500, 1000) == pytest.approx(0.5005)
    assert warmup_factor(999, 1000) == pytest.approx(0.999001)
    assert warmup_factor(1000, 1000) == 1.0 and warmup_factor(5000, 1000) == 1.0
    assert warmup_factor(0, 0) == 1.0  # no warm-up (stages r2 and r3)
    assert STAGES["r1"].warmup_iters == 1000 and STAGES["r2"].warmup_iters == 0


def test_coco_layout_without_annotations_and_its_errors(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    Image.new("RGB", (16, 8)).save(tmp_path / "val/a.jpg")
    annotation_file = tmp_path / "annotations/instances_val.json"
    images = [{"id": 5, "file_name": "a.jpg"}]  # no width/height: read from the file
    annotation_file.write_text(json.dumps({"images": images, "categories": [{"id": 3, "name": "car"}]}))
    ds = load_split(tmp_path, "val")
    assert ds.categories == {3: "car"} and ds.samples[0].boxes == () and ds.aspect_ratios() == [2.0]
    annotation_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_val\.json: not a COCO instances file"):
        load_split(tmp_path, "val")
    images.append({"id": 6, "file_name": "b.jpg", "width": 4, "height": 4})
    annotation_file.write_text(json.dumps({"images": images, "categories": []}))
    with pytest.raises(ValueError, match=r"listed image missing: 1 file\n.*b\.jpg: listed in instances_val\.json"):
        load_split(tmp_path, "val")


def test_coco_layout_drops_boxes_without_a_pixel_and_takes_sizes_from_the_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    Image.new("RGB", (16, 8)).save(tmp_path / "val/a.jpg")
    annotation_file = tmp_path / "annotations/instances_val.json"
    anns = [
        {"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 1, 0, 4]},  # no width: dropped
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 1, 4, 0]},  # no height: dropped
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [2, 1, 0.5, 0.5]},  # under a pixel: dropped
        {"id": 4, "image_id": 5, "category_id": 3, "bbox": [10, 2, 6, 5]},
    ]
    coco = {"images": [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}],
            "categories": [{"id": 3, "name": "car"}], "annotations": anns}
    annotation_file.write_text(json.dumps(coco))
    ds = load_split(tmp_path, "val", train_transforms(hflip=1.0))
    assert ds.source == str(annotation_file)
    assert (ds.samples[0].width, ds.samples[0].height) == (64, 48)  # as the file lists them, not read back
    # Dropped at load, not only by the training transform: evaluation's ground truth holds the same boxes.
    assert ds.samples[0].boxes == ((10.0, 2.0, 16.0, 7.0),)
    assert [p.kind for p in ds.problems] == ["box without area (dropped)"] * 3
    assert [a["bbox"] for a in ds.coco_ground_truth()["annotations"]] == [[10.0, 2.0, 6.0, 5.0]]
    # The transforms given to load_split run: x flips on the 64-wide canvas.
    _, target = ds[0]
    assert target["boxes"].tolist() == [[48.0, 2.0, 54.0, 7.0]]
    anns.append({"id": 7, "image_id": 5, "category_id": 99, "bbox": [1, 1, 2, 2]})
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="unknown class: 1 file\n.*a.jpg: annotation 7: category 99 is not in"):
        load_split(tmp_path, "val")


def test_course_layout_through_load_split(tmp_path):
    for split_dir in ("images", "labels"):
        (tmp_path / "training" / split_dir).mkdir(parents=True)
    image = Image.new("RGB", (60, 40))
    image.paste((255, 255, 255), (0, 0, 10, 40))  # a white band at the left edge
    image.save(tmp_path / "training/images/12.PNG")
    (tmp_path / "training/labels/12.yml").write_text("bboxes: [[2, 5, 12, 35]]\nlabels: [dog]\n")
    ds = load_split(tmp_path, "training", train_transforms(hflip=1.0))
    assert ds.source == str(tmp_path / "training") and [s.image_id for s in ds.samples] == [12]
    flipped, target = ds[0]  # image and boxes flipped together
    assert target["boxes"].tolist() == [[48.0, 5.0, 58.0, 35.0]]
    assert flipped[:, :, 50:].eq(255).all() and flipped[:, :, :50].eq(0).all()


def test_sampler_seed_defaults_to_zero():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 1.3, 1.1]
    assert list(GroupedBatchSampler(ratios, 2)) == list(GroupedBatchSampler(ratios, 2, seed=0))
    assert list(GroupedBatchSampler(ratios, 2)) != list(GroupedBatchSampler(ratios, 2, seed=1))
