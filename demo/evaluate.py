"""COCO box AP/AR of a fine-tuned checkpoint on a labeled split.

    python -m demo.evaluate --checkpoint-path CKPT --dataset-root ROOT --dataset-split validation

Prints pycocotools' 12 summary lines and an AP table per class, and writes ``detections_<split>.json``
(COCO results format) and ``metrics_<split>.json`` to ``--output-dir`` (default: beside the checkpoint).
``--save-pictures N`` also writes the first N images by id to ``<output-dir>/pictures/<id>.png``, ground truth on
the left and the detections at or above ``--score-threshold`` on the right, to see what the numbers mean.
The checkpoint alone defines the model: no backbone file is read. A checkpoint in its stage's directory of a run
(``<output-dir>/r3/``) is refused when a stage it was trained from has been run again since (see demo.lineage).
Under torchrun or srun each process evaluates a share of the images and rank 0 scores them all, with results
identical to a single process.
SIGUSR1 or SIGTERM (Slurm's time-limit warning, preemption) stops inference at the next batch with exit status 75
and nothing written: the requeued job evaluates again.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal during that import must not kill the job
    from moco.runtime import preemption

    preemption.install()

import argparse
import json
from pathlib import Path

from moco.course.images import UnreadableImage, load_rgb
from moco.runtime import checkpoint, preemption, runs
from moco.runtime.devices import add_device_argument, configure_backends
from moco.runtime.distributed import cleanup_distributed, init_distributed
from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.precision import add_inference_argument, autocast_dtype
from moco.runtime.workers import original_message

from . import coco_eval, draw, lineage
from .datasets import load_split
from .engine import predict
from .inference import for_inference
from .model import detector_from_checkpoint

log = get_logger("demo.evaluate")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint-path", required=True, help="a demo.train checkpoint")
    p.add_argument("--dataset-root", required=True)
    p.add_argument("--dataset-split", default="validation")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="images per process")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--output-dir", default=None, help="default: the checkpoint's directory")
    p.add_argument("--save-pictures", type=int, default=0, metavar="N",
                   help="draw the first N images by id, ground truth beside detections, into <output-dir>/pictures")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="the least score of a detection drawn by --save-pictures")
    add_inference_argument(p)
    p.add_argument("--coco-backend", default="auto", choices=coco_eval.BACKENDS,
                   help="COCOeval implementation; auto: faster-coco-eval where installed (same stats, 6x faster), "
                        "else pycocotools, the reference")
    add_device_argument(p)
    return p


def main(argv: list[str] | None = None) -> coco_eval.CocoMetrics | None:
    args = get_parser().parse_args(argv)
    env = init_distributed(args.device)
    setup_logging(env.rank)
    try:
        return _evaluate(args, env)
    except (FileNotFoundError, ValueError, UnreadableImage) as exc:  # an unreadable image is never replaced here
        raise SystemExit(f"error: {original_message(exc)}") from exc
    except preemption.Preempted as exc:
        log.warning("%s: exiting with status %d to be requeued", exc, preemption.EXIT_REQUEUE)
        raise SystemExit(preemption.EXIT_REQUEUE) from exc
    finally:
        cleanup_distributed()


def _evaluate(args: argparse.Namespace, env) -> coco_eval.CocoMetrics | None:
    runs.decided_by_rank0(lambda: lineage.check_chain(args.checkpoint_path), env.device)
    ckpt = checkpoint.load(args.checkpoint_path)
    dataset = load_split(args.dataset_root, args.dataset_split)
    model, _ = detector_from_checkpoint(ckpt, args.checkpoint_path, dataset.categories)
    model = for_inference(model).to(env.device)
    configure_backends(env.device, fixed_shapes=False)
    amp_dtype = autocast_dtype(env.device, args.precision, inference=True)
    log.info("%s (stage %s, epoch %d, run %s) on %s: %d images, %d process(es), %s, precision %s",
             args.checkpoint_path, ckpt["stage"], ckpt["epoch"], ckpt.get("run_id", "unrecorded"), dataset.source,
             len(dataset), env.world_size, env.device, amp_dtype or "fp32")
    predictions = predict(model, dataset, env.device, amp_dtype, args.batch_size, args.workers, env.rank,
                          env.world_size)
    if not env.is_main:
        return None
    results = coco_eval.to_coco_results(predictions, dataset.label_to_category)
    ground_truth = dataset.coco_ground_truth()
    metrics = coco_eval.evaluate(ground_truth, results, args.coco_backend)
    out = Path(args.output_dir) if args.output_dir else Path(args.checkpoint_path).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / f"detections_{args.dataset_split}.json").write_text(json.dumps(results))
    (out / f"metrics_{args.dataset_split}.json").write_text(json.dumps(
        {"checkpoint": str(args.checkpoint_path), "stage": ckpt["stage"], "epoch": ckpt["epoch"],
         "run_id": ckpt.get("run_id"), "split": args.dataset_split, "images": len(dataset),
         "coco_backend": coco_eval.backend(args.coco_backend),
         **metrics.to_dict()}, indent=1))
    print(metrics.summary)
    print()
    print(coco_eval.per_class_table(metrics))
    log.info("detections and metrics written to %s", out)
    if args.save_pictures > 0:
        _save_pictures(dataset, ground_truth["annotations"], results, args.save_pictures, args.score_threshold,
                       out / "pictures")
    return metrics


def _save_pictures(dataset, annotations: list[dict], results: list[dict], count: int, threshold: float,
                   out: Path) -> None:
    """Ground truth beside detections for the first ``count`` images by id: the same ones every run, to compare
    checkpoints by eye."""
    out.mkdir(parents=True, exist_ok=True)
    samples = sorted(dataset.samples, key=lambda s: s.image_id)[:count]
    truth = {s.image_id: [] for s in samples}
    found = {s.image_id: [] for s in samples}
    for records, kept in ((annotations, truth), ((r for r in results if r["score"] >= threshold), found)):
        for record in records:
            kept.get(record["image_id"], []).append(record)
    for sample in samples:
        image = load_rgb(sample.path)
        draw.side_by_side(draw.annotate(image, truth[sample.image_id], dataset.categories),
                          draw.annotate(image, found[sample.image_id], dataset.categories),
                          ("ground truth", f"detections, score >= {threshold:g}")).save(out / f"{sample.image_id}.png")
    log.info("%d pictures, ground truth beside detections, written to %s", len(samples), out)


if __name__ == "__main__":
    main()
