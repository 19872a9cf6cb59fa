import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from demo import coco_eval
from demo.datasets import course_split
from moco.course.layout import CLASSES


@pytest.fixture(scope="module")
def val_set(tiny_data):
    return course_split(tiny_data / "labeled", "validation")


def perfect_results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_predictions_score_one(val_set, backend):
    gt = val_set.coco_ground_truth()
    metrics = coco_eval.evaluate(gt, perfect_results(gt), backend)
    assert metrics.stats["AP"] == pytest.approx(1.0)
    assert metrics.stats["AR100"] == pytest.approx(1.0)
    assert len(metrics.summary.splitlines()) == 12
    assert metrics.summary.splitlines()[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert all(c["AP"] == pytest.approx(1.0) for c in metrics.per_class)


def test_first_course_class_is_scored_like_the_others(val_set):
    """The background-label trap: 'cup or mug' (course index 0) must be category 1 and get a real AP."""
    gt = val_set.coco_ground_truth()
    assert {"id": 1, "name": "cup or mug"} in gt["categories"]
    assert val_set.label_to_category[1] == 1 and CLASSES[0] == "cup or mug"
    cup = [a for a in gt["annotations"] if a["category_id"] == 1]
    assert cup, "the tiny set should use the first course class"
    # Model outputs use label 1 for it; map them through the dataset as the evaluator does.
    predictions = {}
    for image_id in {a["image_id"] for a in cup}:
        boxes = [a["bbox"] for a in cup if a["image_id"] == image_id]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
        predictions[image_id] = {"boxes": xyxy, "scores": torch.ones(len(boxes)),
                                 "labels": torch.ones(len(boxes), dtype=torch.int64)}
    results = coco_eval.to_coco_results(predictions, val_set.label_to_category)
    metrics = coco_eval.evaluate(gt, results)
    per_class = {c["name"]: c for c in metrics.per_class}
    assert per_class["cup or mug"]["AP"] == pytest.approx(1.0)
    assert all(c["AP"] == 0.0 for name, c in per_class.items() if name != "cup or mug")


def jittered_results(gt: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    for r in perfect_results(gt):
        x, y, w, h = r["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        results.append({**r, "bbox": [round(float(v), 2) for v in (x + jitter[0], y + jitter[1],
                                                                     w + jitter[2], h + jitter[3])],
                        "score": round(float(rng.uniform(0.05, 1.0)), 5)})
        if rng.uniform() < 0.3:  # some false positives of another class
            results.append({**results[-1], "category_id": int(rng.integers(1, 101)),
                            "score": round(float(rng.uniform(0.05, 1.0)), 5)})
    return results


def test_matches_pycocotools_on_the_same_json(val_set, tmp_path):
    gt = val_set.coco_ground_truth()
    results = jittered_results(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))

    coco_gt = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        direct.summarize()

    ours = coco_eval.evaluate(gt, results, "pycocotools")
    assert [ours.stats[n] for n in coco_eval.STAT_NAMES] == list(direct.stats)
    assert 0.2 < ours.stats["AP"] < 0.95  # perturbed: neither perfect nor trivial
    assert ours.summary == printed.getvalue().rstrip("\n")
    faster = coco_eval.evaluate(gt, results, "faster")
    assert faster.stats == pytest.approx(ours.stats, abs=1e-12)  # float summation order, no more
    assert faster.summary == ours.summary
    assert [(c["id"], c["gt"]) for c in faster.per_class] == [(c["id"], c["gt"]) for c in ours.per_class]
    assert [c["AP"] for c in faster.per_class] == pytest.approx([c["AP"] for c in ours.per_class], abs=1e-12)


def test_auto_prefers_faster_coco_eval_and_falls_back(monkeypatch):
    assert coco_eval.backend("auto") == "faster"  # a requirement: installed with the project
    monkeypatch.setattr(coco_eval.importlib.util, "find_spec", lambda name: None)
    assert coco_eval.backend("auto") == "pycocotools"
    assert coco_eval.backend("faster") == "faster"
    with pytest.raises(ValueError, match="'cocoapi': one of"):
        coco_eval.backend("cocoapi")


def test_summary_prints_missing_stats_as_pycocotools_does():
    stats = dict.fromkeys(coco_eval.STAT_NAMES, -1.0)
    lines = coco_eval.summary_lines(stats).splitlines()
    assert lines[3] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = -1.000"
    assert lines[6] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = -1.000"


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detections_scores_zero(val_set, backend):
    metrics = coco_eval.evaluate(val_set.coco_ground_truth(), [], backend)
    assert metrics.stats["AP"] == 0.0 and metrics.stats["AR100"] == 0.0
    assert len(metrics.per_class) == len({a["category_id"] for a in val_set.coco_ground_truth()["annotations"]})


def test_per_class_table_names_every_class(val_set):
    gt = val_set.coco_ground_truth()
    table = coco_eval.per_class_table(coco_eval.evaluate(gt, perfect_results(gt)))
    used = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
    assert all(name in table for name in used)
    assert len(table.splitlines()) == len(used) + 1
