"""COCO box evaluation: the 12 summary numbers, their printed lines, and AP per class.

Two implementations of the same COCOeval: faster-coco-eval's C++ one (the default when installed: 6x faster on a
course-sized validation split) and pycocotools, the reference, used when the other is missing or asked for. Their
stats agree to 1e-12, the order in which floats are summed (tested); the printed lines are the same.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("auto", "faster", "pycocotools")
# pycocotools' summarize(): (AP or AR, IoU threshold, area range, maxDets) of each stat, for its printed line
_SUMMARY_ROWS = [("AP", None, "all", 100), ("AP", 0.5, "all", 100), ("AP", 0.75, "all", 100),
                 ("AP", None, "small", 100), ("AP", None, "medium", 100), ("AP", None, "large", 100),
                 ("AR", None, "all", 1), ("AR", None, "all", 10), ("AR", None, "all", 100),
                 ("AR", None, "small", 100), ("AR", None, "medium", 100), ("AR", None, "large", 100)]


@dataclass
class CocoMetrics:
    stats: dict[str, float]  # STAT_NAMES -> value, -1 where pycocotools has nothing to average
    summary: str  # the 12 lines pycocotools prints
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
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress chatter
        return fn(*args)


def backend(name: str = "auto") -> str:
    """The implementation ``name`` stands for: auto is faster-coco-eval where it is installed."""
    if name not in BACKENDS:
        raise ValueError(f"COCO evaluation backend {name!r}: one of {BACKENDS}")
    if name == "auto":
        return "faster" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    return name


def _classes(name: str):
    if name == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, lambda gt, dt: COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *_: None)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, lambda gt, dt: COCOeval(gt, dt, iouType="bbox")


def summary_lines(stats: dict[str, float]) -> str:
    """The 12 lines pycocotools' summarize() prints, from the stats (either backend's)."""
    lines = []
    for (kind, iou, area, max_dets), name in zip(_SUMMARY_ROWS, STAT_NAMES):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{stats[name]:0.3f}")
    return "\n".join(lines)


def evaluate(ground_truth: dict, results: list[dict], backend_name: str = "auto") -> CocoMetrics:
    COCO, COCOeval = _classes(backend(backend_name))
    gt = COCO()
    gt.dataset = ground_truth
    _quiet(gt.createIndex)
    # loadRes cannot take an empty list; a model with no detections is scored against an empty result set.
    dt = _quiet(gt.loadRes, results) if results else COCO()
    if not results:
        dt.dataset = {"images": ground_truth["images"], "categories": ground_truth["categories"], "annotations": []}
        _quiet(dt.createIndex)
    coco_eval = COCOeval(gt, dt)
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    _quiet(coco_eval.summarize)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}

    # precision: T(iou) x R(recall) x K(class) x A(area: all, s, m, l) x M(maxDets: 1, 10, 100)
    precision = coco_eval.eval["precision"]
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    gt_count = Counter(a["category_id"] for a in ground_truth["annotations"])
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
    return CocoMetrics(stats, summary_lines(stats), per_class)


def per_class_table(metrics: CocoMetrics) -> str:
    width = max([len("class")] + [len(c["name"]) for c in metrics.per_class])
    lines = [f"{'id':>4}  {'class':<{width}}  {'boxes':>6}  {'AP':>6}  {'AP50':>6}"]
    lines += [f"{c['id']:>4}  {c['name']:<{width}}  {c['gt']:>6}  {c['AP']:6.3f}  {c['AP50']:6.3f}"
              for c in metrics.per_class]
    return "\n".join(lines)
