"""Detections through to_coco_results and evaluate, and the evaluation batches, against hand-worked values."""
import numpy as np
import pytest
import torch

from demo import coco_eval
from demo.datasets import course_split
from demo.sampler import eval_batches


def _ground_truth() -> dict:
    """Two images, categories 5 and 17, one box of each class; category 40 has no box."""
    return {
        "images": [{"id": 3, "file_name": "3.JPEG", "width": 100, "height": 80},
                   {"id": 8, "file_name": "8.JPEG", "width": 100, "height": 80}],
        "categories": [{"id": 5, "name": "five"}, {"id": 17, "name": "seventeen"}, {"id": 40, "name": "forty"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 8, "category_id": 17, "bbox": [50, 20, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }


LABEL_TO_CATEGORY = {1: 5, 2: 17, 3: 40}


def test_every_detection_becomes_one_record_with_its_own_box_score_and_category():
    predictions = {
        8: {"boxes": torch.tensor([[50.0, 20.0, 90.0, 60.0], [0.0, 0.0, 5.5, 7.25], [10.254, 20.256, 15.5, 27.513]]),
            "scores": torch.tensor([0.75, 0.123456789, 0.2]), "labels": torch.tensor([2, 3, 3])},
        3: {"boxes": torch.tensor([[60.0, 5.0, 70.0, 15.0], [10.0, 10.0, 40.0, 30.0], [1.004, 2.0, 3.0, 4.0]]),
            "scores": torch.tensor([0.5, 0.9, 0.3]), "labels": torch.tensor([1, 1, 2])},
    }
    records = coco_eval.to_coco_results(predictions, LABEL_TO_CATEGORY)
    assert records == [
        {"image_id": 3, "category_id": 5, "bbox": [60.0, 5.0, 10.0, 10.0], "score": 0.5},
        {"image_id": 3, "category_id": 5, "bbox": [10.0, 10.0, 30.0, 20.0], "score": 0.9},
        {"image_id": 3, "category_id": 17, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.3},
        {"image_id": 8, "category_id": 17, "bbox": [50.0, 20.0, 40.0, 40.0], "score": 0.75},
        {"image_id": 8, "category_id": 40, "bbox": [0.0, 0.0, 5.5, 7.25], "score": 0.12346},
        {"image_id": 8, "category_id": 40, "bbox": [10.25, 20.26, 5.25, 7.26], "score": 0.2},  # to 0.01 pixel
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in records)


def test_scores_rank_the_detections_in_evaluation():
    """Image 3: a false positive (score 0.5) listed before the true positive (0.9). Ranked by score, the true
    positive comes first and both classes reach AP 1; ranked by list order, class 5 would get AP 0.5."""
    predictions = {
        3: {"boxes": torch.tensor([[60.0, 5.0, 70.0, 15.0], [10.0, 10.0, 40.0, 30.0]]),
            "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([1, 1])},
        8: {"boxes": torch.tensor([[50.0, 20.0, 90.0, 60.0]]), "scores": torch.tensor([0.6]),
            "labels": torch.tensor([2])},
    }
    metrics = coco_eval.evaluate(_ground_truth(), coco_eval.to_coco_results(predictions, LABEL_TO_CATEGORY))
    assert metrics.stats["AP"] == pytest.approx(1.0)
    predictions[3]["scores"] = torch.tensor([0.9, 0.5])  # now the false positive outranks the true one
    metrics = coco_eval.evaluate(_ground_truth(), coco_eval.to_coco_results(predictions, LABEL_TO_CATEGORY))
    per_class = {c["id"]: c for c in metrics.per_class}
    # Class 5: precision 1/2 at its only recall level, at every IoU threshold.
    assert per_class[5]["AP"] == pytest.approx(0.5) and per_class[5]["AP50"] == pytest.approx(0.5)
    assert per_class[17]["AP"] == pytest.approx(1.0)
    assert metrics.stats["AP"] == pytest.approx(0.75)
    assert [c["id"] for c in metrics.per_class] == [5, 17]  # category 40 has no box: not in the table
    assert [c["gt"] for c in metrics.per_class] == [1, 1]
    assert [c["name"] for c in metrics.per_class] == ["five", "seventeen"]


def test_per_class_ap_over_ten_iou_thresholds_differs_from_ap50():
    """A box of IoU 0.625 with its ground truth matches at the IoU thresholds 0.50, 0.55 and 0.60 only: AP 3/10,
    AP50 1. (Ground truth x 10..40, y 10..30; this box x 10..58, same y: 600 / 960.)"""
    gt = _ground_truth()
    predictions = {3: {"boxes": torch.tensor([[10.0, 10.0, 58.0, 30.0]]), "scores": torch.tensor([0.8]),
                       "labels": torch.tensor([1])},
                   8: {"boxes": torch.tensor([[50.0, 20.0, 90.0, 60.0]]), "scores": torch.tensor([0.8]),
                       "labels": torch.tensor([2])}}
    metrics = coco_eval.evaluate(gt, coco_eval.to_coco_results(predictions, LABEL_TO_CATEGORY))
    per_class = {c["id"]: c for c in metrics.per_class}
    assert per_class[5]["AP50"] == pytest.approx(1.0)
    assert per_class[5]["AP"] == pytest.approx(0.3)
    assert per_class[17]["AP"] == pytest.approx(1.0)
    assert metrics.stats["AP"] == pytest.approx(0.65) and metrics.stats["AP50"] == pytest.approx(1.0)


def test_mean_per_class_ap_equals_the_summary_ap(tiny_data):
    """pycocotools' AP is the mean over classes with boxes of each class's AP (IoU 0.50:0.95) and its AP50 the
    mean of theirs: the per-class table must average back to both, on varied, imperfect detections."""
    val_set = course_split(tiny_data / "labeled", "validation")
    gt = val_set.coco_ground_truth()
    rng = np.random.default_rng(1)
    results = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        dx, dy = rng.normal(0, 0.1, 2) * [w, h]
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x + dx, y + dy, w, h], "score": float(rng.uniform(0.1, 1.0))})
        if rng.uniform() < 0.5:
            results.append({**results[-1], "category_id": int(rng.integers(1, 101)),
                            "score": float(rng.uniform(0.1, 1.0))})
    metrics = coco_eval.evaluate(gt, results)
    assert 0.2 < metrics.stats["AP"] < 0.9
    assert metrics.stats["AP50"] - metrics.stats["AP"] > 0.05  # so AP50 in place of AP would show
    assert np.mean([c["AP"] for c in metrics.per_class]) == pytest.approx(metrics.stats["AP"], abs=1e-9)
    assert np.mean([c["AP50"] for c in metrics.per_class]) == pytest.approx(metrics.stats["AP50"], abs=1e-9)


def test_per_class_table_lines():
    metrics = coco_eval.CocoMetrics({}, "", [
        {"id": 1, "name": "cup or mug", "gt": 12, "AP": 0.61234, "AP50": 1.0},
        {"id": 100, "name": "ox", "gt": 3, "AP": 0.0, "AP50": 0.05},
    ])
    assert coco_eval.per_class_table(metrics).splitlines() == [
        "  id  class        boxes      AP    AP50",
        "   1  cup or mug      12   0.612   1.000",
        " 100  ox               3   0.000   0.050",
    ]
    assert metrics.to_dict() == {"stats": {}, "per_class": metrics.per_class}


def test_eval_batches_are_aspect_grouped_and_keep_the_last_partial_batch():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0]  # landscape (>= 1): 0, 2, 4; portrait: 1, 3
    assert eval_batches(ratios, 2) == [[0, 2], [4, 1], [3]]
    assert eval_batches(ratios, 2, rank=0, world_size=2) == [[0, 2], [3]]
    assert eval_batches(ratios, 2, rank=1, world_size=2) == [[4, 1]]
    assert eval_batches(ratios, 3, rank=1, world_size=3) == [[1, 3]]
    assert eval_batches(ratios, 3, rank=2, world_size=3) == []


def test_per_class_ap_counts_up_to_100_detections_an_image_and_zero_for_crowd_only_classes(capsys):
    """Class 5: eleven false positives outrank the true positive in image 3, so it is found only within the 100
    detections an image that AP allows (not within 10): precision 1/12 at full recall. Class 17's only box is a
    crowd region: nothing to find, AP 0."""
    gt = _ground_truth()
    gt["annotations"][1]["iscrowd"] = 1
    boxes = [[60.0 + i, 5.0, 70.0 + i, 15.0] for i in range(11)] + [[10.0, 10.0, 40.0, 30.0]]
    predictions = {3: {"boxes": torch.tensor(boxes), "scores": torch.linspace(0.9, 0.3, 12),
                       "labels": torch.ones(12, dtype=torch.int64)}}
    metrics = coco_eval.evaluate(gt, coco_eval.to_coco_results(predictions, LABEL_TO_CATEGORY))
    per_class = {c["id"]: c for c in metrics.per_class}
    assert per_class[5]["AP"] == pytest.approx(1 / 12) and per_class[5]["AP50"] == pytest.approx(1 / 12)
    assert per_class[17]["AP"] == 0.0 and per_class[17]["AP50"] == 0.0
    assert metrics.stats["AP"] == pytest.approx(1 / 12)  # the crowd-only class is no class for pycocotools
    assert capsys.readouterr().out == ""  # pycocotools' chatter and summary stay inside the metrics
    lines = metrics.summary.split("\n")  # pycocotools' 12 lines, no blank line before or after
    assert len(lines) == 12 and lines[0].endswith("maxDets=100 ] = 0.083") and lines[-1].endswith("] = -1.000")
