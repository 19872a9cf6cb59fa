"""COCO box evaluation with pycocotools: the 12 summary numbers, their printed lines, and AP per class."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class CocoMetrics:
    stats: dict[str, float]  # STAT_NAMES -> value, -1 where pycocotools has nothing to average
    summary: str  # pycocotools' own 12 lines
    per_class: list[dict] = field(default_factory=list)  # id, name, gt (boxes), AP, AP50; classes with boxes

    def to_dict(self) -> dict:
        return {"stats": self.stats, "per_class": self.per_class}


def to_coco_results(predictions: dict[int, dict], label_to_category: dict[int, int]) -> list[dict]:
    """Detector outputs (``boxes`` XYXY, ``scores``, ``labels`` per image id) as COCO result records."""
    results = []
    for image_id in sorted(predictions):
        p = predictions[image_id]
        for (x0, y0, x1, y1), score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": label_to_category[int(label)],
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(score, 5)})
    return results


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        return fn(*args)


def evaluate(ground_truth: dict, results: list[dict]) -> CocoMetrics:
    gt = COCO()
    gt.dataset = ground_truth
    _quiet(gt.createIndex)
    # loadRes cannot take an empty list; a model with no detections is scored against an empty result set.
    dt = _quiet(gt.loadRes, results) if results else COCO()
    if not results:
        dt.dataset = {"images": ground_truth["images"], "categories": ground_truth["categories"], "annotations": []}
        _quiet(dt.createIndex)
    coco_eval = COCOeval(gt, dt, iouType="bbox")
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}

    # precision: T(iou) x R(recall) x K(class) x A(area: all, s, m, l) x M(maxDets: 1, 10, 100)
    precision = coco_eval.eval["precision"]
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    gt_count = {cat: len(gt.getAnnIds(catIds=[cat])) for cat in coco_eval.params.catIds}
    per_class = []
    for k, cat in enumerate(coco_eval.params.catIds):
        if gt_count[cat] == 0:
            continue
        p_all, p_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class.append({
            "id": int(cat), "name": names[cat], "gt": gt_count[cat],
            "AP": float(np.mean(p_all[p_all > -1])) if (p_all > -1).any() else 0.0,
            "AP50": float(np.mean(p_50[p_50 > -1])) if (p_50 > -1).any() else 0.0,
        })
    return CocoMetrics(stats, out.getvalue().rstrip("\n"), per_class)


def per_class_table(metrics: CocoMetrics) -> str:
    width = max([len("class")] + [len(c["name"]) for c in metrics.per_class])
    lines = [f"{'id':>4}  {'class':<{width}}  {'boxes':>6}  {'AP':>6}  {'AP50':>6}"]
    lines += [f"{c['id']:>4}  {c['name']:<{width}}  {c['gt']:>6}  {c['AP']:6.3f}  {c['AP50']:6.3f}"
              for c in metrics.per_class]
    return "\n".join(lines)
