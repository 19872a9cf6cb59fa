"""Fine-tune Faster R-CNN + FPN on labeled data, in the stages r1, r2, r3 of the original recipe.

    python -m demo.train --stage r1 --bp MOCO_CHECKPOINT --dataset-root ROOT [flags]
    python -m demo.train --stage r2 --dataset-root ROOT [flags]     # continues r1's final checkpoint
    python -m demo.train --stage r3 --dataset-root ROOT [flags]     # continues r2's

Hyper-parameter contract (defaults at total batch 4, see demo/recipe.py):
- ``--protocol moco`` (default), MoCo's detection transfer: BatchNorm trained, as SyncBatchNorm across GPUs (each
  process normalises with its own batch on CPUs); every ResNet stage trained; training short side drawn per image
  from 0.6x to 1x ``--min-size`` in steps of 32 (``--train-sizes``), evaluation at ``--min-size``; r1 lr 0.01.
  ``--protocol original``, the original project's: FrozenBatchNorm2d with the checkpoint's statistics, the top 3
  stages trained, one size, r1 lr 0.03. ``--norm``, ``--trainable-layers`` and ``--train-sizes`` override single
  parts. A run without ``--bp`` (random initialisation, the baseline) gets the same protocol. r2 and r3 keep the
  protocol (and the whole model) of the checkpoint they continue.
- r1: epochs 0..22 with a linear warm-up over min(1000 iterations, one epoch); r2: to epoch 27 at 1/10 of r1's lr;
  r3: to epoch 37 at 1/100. Constant lr within a stage. ``--epochs`` is the epoch a stage ends at, counted from
  the start of r1. ``--lr`` overrides the stage lr, otherwise it scales linearly with ``--batch-size``.
- SGD, momentum 0.9, weight decay 1e-4; horizontal flips; batches grouped by aspect ratio.
- ResNet body from ``--bp`` (MoCo checkpoint, facebookresearch/moco release, or torchvision state dict; its
  architecture is read from the file).

Files, in ``<output-dir>/<stage>/``: ``checkpoint_last.pth.tar`` after every epoch, ``checkpoint_best.pth.tar``
(highest validation AP), ``metrics.jsonl`` and TensorBoard event files (epochs counted from r1's start, so the
stages' curves continue each other), ``train.log``. A checkpoint holds everything evaluation needs
(weights, architecture, class names) and everything a resume needs (optimizer, lr scheduler, scaler, epoch). A
``checkpoint_last`` that does not read (truncated, garbage) is passed over, with a warning, for the stage's
``checkpoint_best`` (the same stage at an earlier or the same epoch); with neither readable the run stops with an
error naming both.
Re-running a stage resumes it from its own last checkpoint; r2 and r3 find the previous stage's final
checkpoint in the same ``--output-dir`` and refuse to start from an unfinished one. SIGUSR1 or SIGTERM (Slurm's
time-limit warning, preemption) stops training at the next step with a checkpoint and exit status 75; the resumed
run continues from that step. ``checkpoint_last`` is also written when an epoch's training ends, before its
validation, so a job killed during validation keeps the epoch's training; a stop during validation exits at the
next batch, and the resumed run redoes that validation only.

Runs that cannot mix: ``--resume PATH`` is used only while the stage has no checkpoint of its own (a requeued job
runs the same command again and must continue, not start over). One process at a time per stage directory: a
second job is refused while the first holds ``run.lock`` (see moco.runtime.runlock). Rank 0 chooses the starting file
for all ranks. Each checkpoint carries its run's id and the identity of what the stage started from, which a resume
checks (see demo.lineage): r1 refuses a backbone from unfinished pretraining, and a stage whose upstream was run
again since refuses to continue. ``--restart`` then moves that stage directory aside, to
``<stage>.replaced-<time>``, and starts the stage afresh from the current upstream; a stage whose upstream is
unchanged continues even with ``--restart``, so the flag is safe in a requeued job's command line.

A training image that cannot be decoded is replaced by the next readable sample, logged once and counted in
metrics.jsonl (``unreadable_images``); once more than ``--max-unreadable`` distinct files have failed, training
stops with a mid-epoch checkpoint, the list of files and exit status 65 (EX_DATAERR), which is not requeued (see
moco.runtime.unreadable). Validation never replaces an image: an unreadable one ends the run with one line naming it.
Exit statuses (see moco.runtime.failures): 0 done; 1 an error to fix, in one line; 65 more unreadable images than
--max-unreadable (a mid-epoch checkpoint kept); 70 the loss was not finite (every rank stops at that step
before applying it, checkpoint_last untouched); 74 a checkpoint could not be written (a full disk: the
previous one is intact); 75 stopped by a signal, to be requeued.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal during that import must not kill the job
    from moco.runtime import preemption

    preemption.install()

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn

from moco.runtime import checkpoint, failures, preemption, runs, unreadable
from moco.runtime.devices import add_device_argument, configure_backends
from moco.runtime.harness import run_training
from moco.runtime.logger import get_logger
from moco.runtime.metrics import MetricsWriter
from moco.runtime.precision import MODES, autocast_dtype
from moco.runtime.runlock import DirectoryLock
from moco.runtime.unreadable import TooManyUnreadable, UnreadableFiles
from moco.runtime.workers import DataLoader

from . import coco_eval, lineage
from .datasets import DetectionSet, ReplacingUnreadable, collate, load_split
from .engine import predict, stage_schedule, train_one_epoch
from .inference import for_inference
from .model import NORMS, DetectorConfig, build_detector, detector_from_checkpoint, load_backbone, read_backbone
from .recipe import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    REFERENCE_BATCH,
    STAGES,
    UNRECORDED_PROTOCOL,
    Protocol,
    multiscale_sizes,
    scaled_lr,
)
from .sampler import GroupedBatchSampler
from .transforms import train_transforms

log = get_logger("demo.train")

BEST = "checkpoint_best.pth.tar"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", required=True, choices=sorted(STAGES))
    p.add_argument("--dataset-root", required=True, help="course layout (<root>/<split>/images, labels) or COCO")
    p.add_argument("--train-split", default="training")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--output-dir", default="runs/fpn", help="the run: one sub-directory per stage")
    p.add_argument("--strict-labels", action="store_true",
                   help="refuse boxes reaching outside their image or without area, instead of clamping or dropping "
                        "them (see 'Bad data' in the README)")
    p.add_argument("--bp", default="", help="backbone checkpoint for r1; none: random initialisation (a baseline)")
    p.add_argument("--resume", default="",
                   help="start from this checkpoint instead of the previous stage's (or --bp), while the stage has no "
                        "checkpoint_last of its own; once it has, that wins (a requeue continues) and --resume is "
                        "ignored, with a warning")
    p.add_argument("--restart", action="store_true",
                   help="when this stage's checkpoint was trained from an upstream that has changed since (the "
                        "previous stage run again; for r1 another --bp), move the stage directory aside to "
                        "<stage>.replaced-<time> and start afresh; an unchanged one continues")
    p.add_argument("--lr", type=float, default=None,
                   help="default: the protocol's r1 lr (r2: 1/10 of it, r3: 1/100) x batch-size / 4")
    p.add_argument("-b", "--batch-size", type=int, default=REFERENCE_BATCH,
                   help="total over all processes; default: the recipe's")
    p.add_argument("--epochs", type=int, default=None, help="epoch this stage ends at; default: the recipe's")
    p.add_argument("-j", "--workers", type=int, default=4, help="data-loading workers per process")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-p", "--print-freq", type=int, default=20, help="log every N steps")
    p.add_argument("--precision", default="auto", choices=MODES,
                   help="autocast dtype of training; auto: bf16 where native, fp16 on older GPUs. Validation's auto: "
                        "fp16 on GPUs, fp32 on the CPU. Box geometry is fp32 under all of them")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations; default on with CUDA")
    add_device_argument(p)
    unreadable.add_argument(p)
    p.add_argument("--val-batch-size", type=int, default=4, help="images per process in validation")
    p.add_argument("--val-freq", type=int, default=1,
                   help="validate every N epochs (counted from r1's start) and at the stage's last epoch; the epochs "
                        "between keep their checkpoint_last and a record without 'val'")
    model = p.add_argument_group("model (r1 only; later stages take it from their checkpoint)")
    model.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                       help=f"transfer protocol (see demo/recipe.py); r1's default: {DEFAULT_PROTOCOL}; r2 and r3: "
                            f"the checkpoint's")
    model.add_argument("-a", "--arch", default=None, help="ResNet for random init; with --bp, read from the file")
    model.add_argument("--trainable-layers", type=int, default=None,
                       help="ResNet stages trained, from the top (0-5); default: the protocol's (moco 5, original 3)")
    model.add_argument("--norm", default=None, choices=NORMS,
                       help="frozen: FrozenBatchNorm2d; sync: BatchNorm trained, SyncBatchNorm across GPUs (needs "
                            "--trainable-layers 5); default: the protocol's (moco sync, original frozen)")
    model.add_argument("--min-size", type=int, default=800, help="short image side after resizing, in evaluation")
    model.add_argument("--train-sizes", type=int, nargs="+", default=None, metavar="SIZE",
                       help="short sides drawn from per training image; default: moco 0.6x to 1x --min-size in steps "
                            "of 32, original --min-size alone")
    model.add_argument("--max-size", type=int, default=1333, help="long image side at most")
    model.add_argument("--rois-per-image", type=int, default=512, help="RoIs sampled per image for the box head")
    model.add_argument("--fpn-channels", type=int, default=256, help="FPN width; 128 halves the cost of tiny runs")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.val_freq < 1:
        parser.error(f"--val-freq {args.val_freq}: at least 1")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:  # before any process group or data: nothing would train
            parser.error(f"{flag} {value}: at least 1, or nothing would train")
    stage_dir = Path(args.output_dir) / args.stage

    def train(env, metrics_writer: MetricsWriter, aside: Path | None) -> dict:
        if aside is not None:
            log.warning("--restart: the stale stage %s was moved aside to %s; the stage starts afresh", stage_dir,
                        aside)
        return _train(args, env, stage_dir, metrics_writer)

    # The log file once the directory is this run's: --restart may move it aside first.
    return run_training(stage_dir, args.device, train, lambda lock: claim_stage(args, stage_dir, lock))


def claim_stage(args: argparse.Namespace, stage_dir: Path, lock: DirectoryLock) -> Path | None:
    """Rank 0: lock the stage directory; with --restart, first move it aside if its checkpoint's upstream has
    changed. Returns where it went, or None."""
    lock.acquire()
    own = stage_dir / checkpoint.LAST
    if not args.restart or not own.is_file():
        return None
    own, _ = runs.first_loadable_checkpoint([own, stage_dir / BEST])  # as starting_point chooses, which says why
    if lineage.changed_upstream(checkpoint.load(own, mmap=True), own, stage_dir, args.bp) is None:
        log.info("--restart: %s still matches what it was trained from, and continues", own)
        return None
    aside = lineage.move_aside(stage_dir)
    lock.acquire()  # the new, empty directory's
    return aside


def starting_point(args: argparse.Namespace, stage_dir: Path) -> tuple[Path | None, str, dict | str | None, str]:
    """Rank 0's decision for every rank: (file, how, upstream, run id). How: "resume" this stage, "chain" from the
    previous stage's end, or "fresh". Upstream: what the checkpoints will record the stage started from."""
    stage = STAGES[args.stage]
    path = runs.resume_file(stage_dir / checkpoint.LAST, args.resume, [stage_dir / BEST])
    if path is None and stage.previous:
        path = stage_dir.parent / stage.previous / checkpoint.LAST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: stage {stage.previous} has not run in {stage_dir.parent}; "
                                    f"run --stage {stage.previous} first, or give --resume")
    elif path is None:
        return None, "fresh", lineage.check_backbone(args.bp) if args.bp else None, runs.new_run_id()
    ckpt = checkpoint.load(path, mmap=True)  # the small entries: every rank loads the chosen file in full later
    if "model_config" not in ckpt:
        raise ValueError(f"{path}: not a detector checkpoint of demo.train (a backbone goes to --bp)")
    if ckpt["stage"] == stage.name:
        changed = lineage.changed_upstream(ckpt, path, stage_dir, args.bp)
        if changed:
            raise ValueError(f"{changed}. Continuing stage {stage.name} would mix two runs: start it afresh with "
                             f"--restart (moves {stage_dir} aside, keeping it), or move {stage_dir} away yourself")
        return path, "resume", ckpt.get("upstream", lineage.UNKNOWN), ckpt.get("run_id") or runs.new_run_id()
    if ckpt["stage"] != stage.previous:
        raise ValueError(f"{path}: a stage {ckpt['stage']} checkpoint; stage {stage.name} starts from "
                         f"{stage.previous or 'a backbone (--bp)'}")
    if ckpt["epoch"] < ckpt["stage_end"]:
        raise ValueError(f"{path}: stage {ckpt['stage']} stopped at epoch {ckpt['epoch']} of {ckpt['stage_end']}; "
                         f"finish it first (re-running --stage {ckpt['stage']} resumes it)")
    return path, "chain", runs.identity(ckpt, path), runs.new_run_id()


def chosen_protocol(args: argparse.Namespace, ckpt: dict | None, source: Path | None) -> Protocol:
    """r1 from a backbone: --protocol or the default. Any stage from a checkpoint: the checkpoint's."""
    if ckpt is None:
        return PROTOCOLS[args.protocol or DEFAULT_PROTOCOL]
    recorded = ckpt.get("protocol", UNRECORDED_PROTOCOL)
    if args.protocol and args.protocol != recorded:
        raise ValueError(f"{source}: trained under --protocol {recorded}, which stage {args.stage} continues; "
                         f"--protocol {args.protocol} applies where r1 starts from a backbone")
    return PROTOCOLS[recorded]


def detector_config(args: argparse.Namespace, protocol: Protocol, arch: str, num_classes: int) -> DetectorConfig:
    """The protocol's network, with any part the flags set themselves."""
    norm = args.norm or protocol.norm
    trainable_layers = args.trainable_layers if args.trainable_layers is not None else (
        5 if norm == "sync" else protocol.trainable_layers)
    train_sizes = args.train_sizes or (multiscale_sizes(args.min_size) if protocol.multiscale else ())
    return DetectorConfig(arch=arch, num_classes=num_classes, trainable_layers=trainable_layers, norm=norm,
                          min_size=args.min_size, train_min_sizes=tuple(train_sizes), max_size=args.max_size,
                          rois_per_image=args.rois_per_image, fpn_channels=args.fpn_channels)


def datasets(args: argparse.Namespace) -> tuple[DetectionSet, DetectionSet]:
    """The training split (with the stage's augmentation) and the validation split, which must name the same
    categories."""
    train_set = load_split(args.dataset_root, args.train_split, train_transforms(), args.strict_labels)
    val_set = load_split(args.dataset_root, args.val_split, strict=args.strict_labels)
    if train_set.categories != val_set.categories:
        raise ValueError(f"{val_set.source}: categories differ from {train_set.source}")
    return train_set, val_set


def detector(args: argparse.Namespace, ckpt: dict | None, source: Path | None, protocol: Protocol,
             train_set: DetectionSet, env, channels_last: bool) -> tuple[nn.Module, DetectorConfig]:
    """The stage's detector on its device: the checkpoint's it continues, or a new one on the --bp backbone (a
    random one without), the same on every rank."""
    torch.manual_seed(args.seed)  # identical heads on every rank
    if ckpt is None:
        arch, weights = read_backbone(args.bp) if args.bp else (args.arch or "resnet50", None)
        if args.bp and args.arch and args.arch != arch:
            raise ValueError(f"{args.bp}: holds a {arch}, not the --arch {args.arch} asked for")
        config = detector_config(args, protocol, arch, train_set.num_classes)
        model = build_detector(config)
        if weights is not None:
            load_backbone(model, weights, args.bp)
        else:
            log.warning("no --bp: %s backbone randomly initialised (a baseline, not a transfer)", arch)
    else:
        model, config = detector_from_checkpoint(ckpt, source, train_set.categories)
    model.to(env.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if config.norm == "sync" and env.distributed:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("SyncBatchNorm needs CUDA: on CPU each process normalises with its own batch")
    return model, config


def restore(ckpt: dict | None, how: str, optimizer: torch.optim.Optimizer, scaler, lr: float, warmup: int,
            lr_asked: float | None) -> tuple[torch.optim.lr_scheduler.LambdaLR, int, float, dict | None]:
    """What the stage carries over from its starting checkpoint: the optimizer's momentum and the scaler (between
    stages too) and, resuming its own stage, the schedule's place, the step reached in the epoch, the best AP and
    the last validation. Returns (scheduler, start_step, best_ap, last_val)."""
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    resumed = how == "resume"
    scheduler = stage_schedule(optimizer, lr, warmup, ckpt["lr_scheduler"] if resumed else None, lr_asked)
    if not resumed:
        return scheduler, 0, -1.0, None
    return scheduler, int(ckpt.get("step", 0)), float(ckpt["best_ap"]), ckpt["val"]


def _train(args: argparse.Namespace, env, stage_dir: Path, metrics_writer: MetricsWriter) -> dict:
    stage = STAGES[args.stage]
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is the total and must divide among {env.world_size} "
                         f"processes")
    source, how, upstream, run_id = runs.decided_by_rank0(lambda: starting_point(args, stage_dir), env.device)
    ckpt = checkpoint.load(source) if source is not None else None
    if args.bp and how != "fresh":
        log.warning("--bp %s not loaded: stage %s continues %s", args.bp, stage.name, source)
    start_epoch = int(ckpt["epoch"]) if ckpt is not None else 0
    end_epoch = args.epochs if args.epochs is not None else stage.end_epoch
    if how == "resume" and args.epochs is None:
        end_epoch = int(ckpt["stage_end"])
    if end_epoch <= start_epoch and how != "resume":  # before the data: a request that would train nothing
        raise failures.UsageError(f"stage {stage.name} would end at epoch {end_epoch} but starts at {start_epoch}: "
                                  f"give a larger --epochs")
    train_set, val_set = datasets(args)
    device = env.device
    configure_backends(device, fixed_shapes=False)
    amp_dtype = autocast_dtype(device, args.precision)
    val_dtype = autocast_dtype(device, args.precision, inference=True)  # as demo.evaluate's: the same AP
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"

    protocol = chosen_protocol(args, ckpt, source)
    model, config = detector(args, ckpt, source, protocol, train_set, env, channels_last)

    per_rank_batch = args.batch_size // env.world_size
    sampler = GroupedBatchSampler(train_set.aspect_ratios(), per_rank_batch, env.rank, env.world_size, args.seed)
    loader = DataLoader(ReplacingUnreadable(train_set, args.max_unreadable), batch_sampler=sampler,
                        num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)
    unreadable_files = UnreadableFiles(args.max_unreadable, device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    lr = args.lr if args.lr is not None else scaled_lr(protocol, stage, args.batch_size)
    warmup = min(stage.warmup_iters, len(loader))

    scheduler, start_step, best_ap, last_val = restore(ckpt, how, optimizer, scaler, lr, warmup, args.lr)
    lr = scheduler.base_lrs[0]
    log.info("stage %s (%s%s): epochs %d..%d (from step %d), protocol %s, lr %.4g, batch %d on %d process(es) [%s], "
             "%s, precision %s (validation %s)", stage.name, how, f" from {source}" if source else "", start_epoch,
             end_epoch - 1, start_step, protocol.name, lr, args.batch_size, env.world_size, env.launcher, device,
             amp_dtype or "fp32", val_dtype or "fp32")
    log.info("run id %s, started from %s%s", run_id, lineage.describe_upstream(upstream, stage.previous),
             f" ({upstream['path']})" if isinstance(upstream, dict) else "")
    log.info("model %s; train %d images (%s), validation %d images, %d classes", config.to_dict(),
             len(train_set), train_set.source, len(val_set), len(train_set.categories))

    ddp_model = model
    if env.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ground_truth = val_set.coco_ground_truth() if env.is_main else None

    def state(epochs_done: int, step: int, val) -> dict:
        return {
            "model": model.state_dict(),
            "model_config": config.to_dict(),
            "protocol": protocol.name,
            "categories": [[k, v] for k, v in train_set.categories.items()],
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epochs_done,
            "step": step,  # steps of the next epoch already trained: non-zero only mid-epoch
            "stage": stage.name,
            "stage_end": end_epoch,
            "run_id": run_id,
            "upstream": upstream,
            "best_ap": best_ap,
            "val": val,
            "args": dict(vars(args)),
        }

    record: dict = {}
    steps_per_epoch = len(loader)

    def validated(done: int, epoch_lr: float, stats: dict, predictions: dict) -> None:
        """Rank 0: score the epoch's validation, then write its checkpoints and its record."""
        nonlocal record, best_ap, last_val
        metrics = coco_eval.evaluate(ground_truth, coco_eval.to_coco_results(predictions, val_set.label_to_category))
        record = {"epoch": done, "stage": stage.name, "lr": epoch_lr, **stats, "val": metrics.stats}
        is_best = metrics.stats["AP"] > best_ap
        best_ap, last_val = max(best_ap, metrics.stats["AP"]), metrics.stats
        snapshot = state(done, 0, last_val)
        checkpoint.save_atomic(snapshot, stage_dir / checkpoint.LAST)
        if is_best:
            checkpoint.save_atomic(snapshot, stage_dir / BEST)
        metrics_writer.write(record)
        log.info("epoch %d/%d done: loss %.4f, %.1f img/s, validation AP %.4f AP50 %.4f%s", done, end_epoch,
                 stats.get("loss", math.nan), stats["images_per_s"], metrics.stats["AP"], metrics.stats["AP50"],
                 " (best)" if is_best else "")

    def not_validated(done: int, epoch_lr: float, stats: dict) -> None:
        """Rank 0: an epoch that --val-freq passes over is finished without validation."""
        nonlocal record
        record = {"epoch": done, "stage": stage.name, "lr": epoch_lr, **stats}
        checkpoint.save_atomic(state(done, 0, last_val), stage_dir / checkpoint.LAST)
        metrics_writer.write(record)
        log.info("epoch %d/%d done: loss %.4f, %.1f img/s (validation every %d epochs)", done, end_epoch,
                 stats.get("loss", math.nan), stats["images_per_s"], args.val_freq)

    # Rank 0 alone saves, while the others wait for its outcome (runs.decided_by_rank0): a failed save stops them
    # too, where at a barrier they would wait out the collective timeout.
    for epoch in range(start_epoch, end_epoch):
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, skip=first_step)
        epoch_lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step: shows the warm-up
        try:
            stats = train_one_epoch(ddp_model, loader, optimizer, scheduler, scaler, amp_dtype, device, epoch,
                                    args.print_freq, unreadable_files, first_step)
        except (preemption.Preempted, TooManyUnreadable) as stop:
            step = stop.step  # the except clause unbinds ``stop``; the save below reads the step
            runs.decided_by_rank0(
                lambda: checkpoint.save_atomic(state(epoch, step, last_val), stage_dir / checkpoint.LAST), device)
            raise
        # The epoch's training is kept even if the job is killed during validation, its statistics with it for the
        # record that the resumed run writes after redoing the validation.
        if first_step == steps_per_epoch:
            stats = ckpt.get("epoch_stats") or stats
        else:
            runs.decided_by_rank0(lambda: checkpoint.save_atomic(
                {**state(epoch, steps_per_epoch, last_val), "epoch_stats": stats}, stage_dir / checkpoint.LAST), device)
        if preemption.stop_requested(device):  # collective: rank 0's save above is done
            raise preemption.Preempted(steps_per_epoch)
        done = epoch + 1
        if done % args.val_freq and done != end_epoch:
            runs.decided_by_rank0(lambda: not_validated(done, epoch_lr, stats), device)
            continue
        log.info("epoch %d/%d: validation on %d images", done, end_epoch, len(val_set))
        try:
            predictions = predict(for_inference(model), val_set, device, val_dtype, args.val_batch_size,
                                  args.workers, env.rank, env.world_size)
        except preemption.Preempted as stop:  # the resumed run redoes this validation only
            raise preemption.Preempted(steps_per_epoch) from stop
        runs.decided_by_rank0(lambda: validated(done, epoch_lr, stats, predictions), device)
    if start_epoch >= end_epoch:
        log.info("stage %s already complete at epoch %d (%s)", stage.name, start_epoch, source)
    return record


if __name__ == "__main__":
    main()
