"""MoCo v1/v2 pretraining of a torchvision ResNet on unlabeled images.

    python -m moco.train DATA_DIR [flags]

Flags follow facebookresearch/moco's main_moco.py, defaults included (MoCo v1); MoCo v2 is
``--mlp --moco-t 0.2 --aug-plus --cos``. The original project's recipe: ``-a resnet50 --lr 0.015
--batch-size 128 --epochs 100 --mlp --moco-t 0.2 --aug-plus --cos`` on 4 GPUs.

Differences from main_moco.py:
- No --dist-url/--world-size/--rank/--multiprocessing-distributed: the launch (torchrun, Slurm srun, or a
  plain process) is detected, one process per GPU (see moco.runtime.distributed).
- --batch-size is the total over all processes; K must be a multiple of it.
- Re-running the same command with the same --output-dir resumes from checkpoint_last.pth.tar, schedule
  included. --resume PATH starts from a given checkpoint, but only while the directory has no checkpoint_last of
  its own, so that a requeued job continues instead of starting over. A resume refuses a checkpoint written with
  other --epochs, -a, --batch-size, --moco-k, --moco-dim or --mlp (more --epochs for a finished run would bend
  its cosine schedule mid-run). One process per --output-dir: a second job is refused while the first runs (see
  moco.runtime.runlock). Every checkpoint carries the run's id (see moco.runtime.runs), which fine-tuning records.
- A checkpoint_last that does not read (truncated, garbage) is passed over, with a warning, for the newest readable
  numbered checkpoint_NNNN; with none readable the run stops with an error naming the files tried. --keep N keeps
  only the newest N numbered checkpoints.
- SIGUSR1 or SIGTERM (Slurm's time-limit warning, preemption) stops the run at the next step with a mid-epoch
  checkpoint and exit status 75; the resumed run continues from that step (see moco.runtime.preemption).
- An image that cannot be read is replaced by the next readable one, logged once and counted in metrics.jsonl
  (``unreadable_images``); once more than --max-unreadable distinct files have failed, the run stops with a
  mid-epoch checkpoint, the list of files and exit status 65 (EX_DATAERR), which is not requeued (see
  moco.runtime.unreadable). An unreadable image of the kNN probe ends the run at its start with one line naming the
  file.
- Exit statuses (see moco.runtime.failures): 0 done; 1 an error to fix, in one line; 65 more unreadable images than
  --max-unreadable (a mid-epoch checkpoint kept); 70 the loss was not finite (every rank stops at that step
  before applying it, checkpoint_last untouched); 74 a checkpoint could not be written (a full disk: the
  previous one is intact); 75 stopped by a signal, to be requeued.
- In a single process, batch-norm statistics are computed per sub-batch (--bn-splits) and keys are shuffled
  among sub-batches: shuffle-BN's guard against the batch-statistics shortcut, without a second GPU.
- Mixed precision (--precision), channels_last, device-side normalisation; --image-size for tiny runs;
  a kNN probe on labeled object crops every --probe-freq epochs (--probe-data).
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal during that import must not kill the job
    from moco.runtime import preemption

    preemption.install()

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tv_models

from .augment import Normalize, TwoCropsTransform, moco_augmentation
from .batchnorm import convert_split_batchnorm
from .builder import MoCo
from .data import EpochSampler, UnlabeledImages, find_unlabeled_images
from .probe import KnnProbe
from .runtime import checkpoint, failures, preemption, runs, unreadable
from .runtime.devices import add_device_argument, configure_backends
from .runtime.distributed import all_reduce_mean, average_running_stats
from .runtime.harness import run_training
from .runtime.logger import get_logger
from .runtime.metrics import MetricsWriter
from .runtime.precision import MODES, autocast_dtype, optimizer_step
from .runtime.progress import EpochProgress
from .runtime.unreadable import TooManyUnreadable, UnreadableFiles
from .runtime.workers import DataLoader

log = get_logger("moco.train")

ARCHS = sorted(
    name for name in tv_models.list_models(module=tv_models) if name.startswith(("resnet", "resnext", "wide_resnet"))
)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DATA_DIR", help="unlabeled images: train/, train/unlabeled/ or a flat folder")
    p.add_argument("-a", "--arch", default="resnet50", choices=ARCHS)
    p.add_argument("-j", "--workers", default=4, type=int, help="data-loading workers per process")
    p.add_argument("--epochs", default=200, type=int)
    p.add_argument("-b", "--batch-size", default=256, type=int, help="total over all processes")
    p.add_argument("--lr", "--learning-rate", default=0.03, type=float, dest="lr")
    p.add_argument("--schedule", default=[120, 160], nargs="*", type=int,
                   help="lr x0.1 at these epochs (without --cos)")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    p.add_argument("-p", "--print-freq", default=10, type=int, help="log every N steps")
    p.add_argument("--resume", default="", type=str,
                   help="start from this checkpoint while --output-dir has no checkpoint_last; once it has one, that "
                        "wins (a requeued job continues its own progress) and --resume is ignored, with a warning")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--moco-dim", default=128, type=int)
    p.add_argument("--moco-k", default=65536, type=int, help="queue size: negatives per query")
    p.add_argument("--moco-m", default=0.999, type=float, help="key-encoder momentum")
    p.add_argument("--moco-t", default=0.07, type=float, help="softmax temperature")
    p.add_argument("--mlp", action="store_true", help="2-layer MLP head (MoCo v2)")
    p.add_argument("--aug-plus", action="store_true", help="MoCo v2 augmentation, with blur")
    p.add_argument("--cos", action="store_true", help="cosine learning-rate schedule")
    p.add_argument("--warmup-epochs", default=0, type=int,
                   help="lr rises linearly, step by step, from 0 to the schedule's over these first epochs")
    # Added by this project.
    p.add_argument("--output-dir", default="runs/moco",
                   help="checkpoints, log, metrics.jsonl and TensorBoard event files go here")
    p.add_argument("--image-size", default=224, type=int, help="crop size; smaller for quick runs")
    p.add_argument("--precision", default="auto", choices=MODES,
                   help="autocast dtype; auto: bf16 where native (Ampere+, AVX-512 BF16 CPUs), fp16 on older GPUs")
    add_device_argument(p)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations; default: on with CUDA or bf16, off for fp32 on CPU, where it is slower")
    p.add_argument("--bn-splits", default=8, type=int,
                   help="BN sub-batches in a single process (shuffle-BN stand-in); ignored under DDP; 1 disables")
    p.add_argument("--save-freq", default=10, type=int, help="keep checkpoint_NNNN every N epochs (last one always)")
    p.add_argument("--keep", default=0, type=int,
                   help="after each numbered save keep only the newest N checkpoint_NNNN (0: all); checkpoint_last "
                        "is always kept")
    p.add_argument("--probe-data", default="",
                   help="labeled root (<root>/training, <root>/validation) for the kNN probe")
    p.add_argument("--probe-freq", default=10, type=int, help="kNN probe every N epochs (0: never)")
    p.add_argument("--probe-k", default=20, type=int)
    p.add_argument("--probe-max-images", default=2000, type=int, help="labeled images per split used by the probe")
    unreadable.add_argument(p)
    return p


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is the total and must divide among {world_size} processes")
    if args.moco_k % args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} must be a multiple of --batch-size {args.batch_size}: "
                         f"each step enqueues a whole batch of keys (try --moco-k "
                         f"{args.moco_k // args.batch_size * args.batch_size or args.batch_size})")
    if args.keep < 0:
        raise SystemExit(f"--keep {args.keep}: a number of checkpoints, or 0 to keep them all")
    per_rank = args.batch_size // world_size
    if world_size == 1 and args.bn_splits > 1 and per_rank % args.bn_splits:
        raise SystemExit(f"--batch-size {per_rank} must be a multiple of --bn-splits {args.bn_splits}")


# A run's identity: a checkpoint written under other values is not continued under these. --epochs belongs to it:
# the cosine schedule is laid out over the run's epochs, and fine-tuning judges a backbone finished by it.
RECIPE_FLAGS = {"epochs": "--epochs", "arch": "-a", "batch_size": "--batch-size", "moco_k": "--moco-k",
                "moco_dim": "--moco-dim", "mlp": "--mlp"}


def check_recipe(ckpt: dict, path: Path, args: argparse.Namespace) -> None:
    """Refuse to continue a checkpoint written under another recipe (older checkpoints record only their arch)."""
    recorded = ckpt.get("args") or {"arch": ckpt.get("arch")}

    def show(value) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    differences = [f"{flag} {show(getattr(args, name))} (checkpoint: {show(recorded[name])})"
                   for name, flag in RECIPE_FLAGS.items()
                   if recorded.get(name) is not None and recorded[name] != getattr(args, name)]
    if differences:
        raise ValueError(f"{path}: written by a run with another recipe: {', '.join(differences)}. A run continues "
                         f"only with the values it started with: repeat them, or start this one in another "
                         f"--output-dir")


def learning_rate(epoch: int, args: argparse.Namespace, progress: float = 0.0) -> float:
    """The lr of a step ``progress`` (0..1) of the way through ``epoch``: the schedule of the epoch, scaled down
    during the warm-up."""
    if args.cos:
        lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    else:
        lr = args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)
    if epoch < args.warmup_epochs:
        lr *= (epoch + progress) / args.warmup_epochs
    return lr


def state_dict_with_prefix(model: nn.Module) -> dict:
    """facebookresearch/moco's layout (``module.encoder_q.*``) whether or not DDP wraps the model."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


def default_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """NHWC where the convolution kernels prefer it: on GPUs and under autocast; fp32 on a CPU is slower in it."""
    return device.type == "cuda" or amp_dtype is not None


def build_model(args: argparse.Namespace, world_size: int, preprocess: nn.Module | None = None) -> MoCo:
    """MoCo as the flags say; ``preprocess`` (e.g. ``Normalize``) runs inside its forward."""
    model = MoCo(tv_models.get_model_builder(args.arch), args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp,
                 preprocess)
    if world_size == 1 and args.bn_splits > 1:
        convert_split_batchnorm(model, args.bn_splits)
    return model


def build_loader(args: argparse.Namespace, paths: list, rank: int, world_size: int,
                 device: torch.device) -> tuple[DataLoader, EpochSampler]:
    """This rank's loader of two aug+ views an image, uint8, in batches of --batch-size / world size."""
    dataset = UnlabeledImages(paths, TwoCropsTransform(moco_augmentation(args.image_size, args.aug_plus)), args.seed,
                              args.max_unreadable)
    sampler = EpochSampler(len(dataset), rank, world_size, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size // world_size, sampler=sampler, num_workers=args.workers,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    return loader, sampler


def moco_step(model, im_q, im_k, optimizer, scaler, amp_dtype, device, watch: failures.LossWatch, step: int):
    """One update from a batch of uint8 views, with nothing read back from the device. Returns loss, logits and
    labels."""
    # uint8 to the device: the model normalises them, after the key shuffle has moved a quarter of the bytes.
    im_q, im_k = im_q.to(device, non_blocking=True), im_k.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits, labels = model(im_q, im_k)
    loss = F.cross_entropy(logits, labels)
    watch.observe(step, loss, logit_figures(logits))
    optimizer_step(loss, optimizer, scaler)
    return loss, logits, labels


def train_one_epoch(model, loader, optimizer, scaler, amp_dtype, epoch, args, device, world_size: int,
                    unreadable_files: UnreadableFiles, watch: failures.LossWatch, first_step: int = 0) -> dict:
    """One epoch from ``first_step`` on (non-zero when resumed mid-epoch) of a model that normalises its uint8
    views itself; raises ``Preempted`` on a stop, ``TooManyUnreadable`` past --max-unreadable and ``NonFiniteLoss``
    at ``watch``'s checks."""
    model.train()
    unreadable_files.start_epoch()
    # Sums stay on the device: reading them every step would make the host wait for the GPU every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, start = 0, time.perf_counter()
    steps = first_step + len(loader)
    progress = EpochProgress(log, epoch, steps, first_step, args.print_freq)
    for step, ((im_q, im_k), failed, errors) in enumerate(loader, first_step):
        if preemption.stop_requested(device, step):
            raise preemption.Preempted(step)
        if epoch < args.warmup_epochs:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch, args, (step + 1) / steps)
        unreadable_files.update(step, failed.tolist(), errors)
        if watch.due(step):
            watch.check(epoch)
        loss, logits, labels = moco_step(model, im_q, im_k, optimizer, scaler, amp_dtype, device, watch, step)
        n = labels.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == 0).sum()
        seen += n
        progress.update(step, n * world_size,
                        lambda: f"loss {loss.item():.4f} acc@1 {100.0 * correct.item() / seen:.1f}%")
    watch.check(epoch)  # before the epoch's statistics and checkpoint
    elapsed = time.perf_counter() - start
    return {
        "loss": all_reduce_mean(loss_sum.item() / max(seen, 1), device),
        "acc1": all_reduce_mean(100.0 * correct.item() / max(seen, 1), device),
        "images_per_s": seen * world_size / elapsed,
        "unreadable_images": unreadable_files.epoch_count(),
    }


@torch.no_grad()
def logit_figures(logits: torch.Tensor) -> torch.Tensor:
    """On the device: the logits' count, how many are not finite, and the range of the others (inf, -inf for
    none), for ``describe_logits``."""
    finite = torch.isfinite(logits)
    inf = torch.tensor(float("inf"), dtype=logits.dtype, device=logits.device)
    low, high = torch.where(finite, logits, inf).amin(), torch.where(finite, logits, -inf).amax()
    count = torch.full((), float(logits.numel()), device=logits.device)
    return torch.stack([count, (~finite).sum().float(), low.float(), high.float()])


def describe_logits(figures) -> str:
    """What a diverged step's message says of its logits (``logit_figures``): how many are not finite, and the
    range of the others."""
    count, bad, low, high = figures
    spread = f", the others in [{low:.4g}, {high:.4g}]" if bad < count else ""
    return f"{int(bad)} of {int(count)} logits not finite{spread}"


@torch.no_grad()
def key_spread(queue: torch.Tensor) -> float:
    """Per-dimension std of the queued (unit) keys, times sqrt(dim): about 1 when keys spread over the sphere,
    0 when they collapse to one point. Collapse leaves loss and accuracy plausible, so it is logged on its own."""
    return float(queue.float().std(dim=1).mean() * queue.shape[0] ** 0.5)


def main(argv: list[str] | None = None) -> MoCo:
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--moco-k", args.moco_k)):
        if value < 1:  # before any process group or data: a request that would train nothing, refused
            parser.error(f"{flag} {value}: at least 1, or nothing would train")
    output_dir = Path(args.output_dir)
    return run_training(output_dir, args.device, lambda env, metrics_writer, _: _train(args, env, output_dir,
                                                                                         metrics_writer))


def _train(args: argparse.Namespace, env, output_dir: Path, metrics_writer: MetricsWriter) -> MoCo:
    validate_args(args, env.world_size)
    paths = find_unlabeled_images(args.data)  # first: a wrong path should fail before any model is built
    per_rank_batch = args.batch_size // env.world_size
    if len(paths) // env.world_size < per_rank_batch:
        raise failures.UsageError(f"{args.data}: {len(paths)} images cannot fill one batch of {args.batch_size}"
                                  f"{f' on {env.world_size} processes' if env.world_size > 1 else ''}")
    device = env.device
    configure_backends(device, fixed_shapes=True)
    amp_dtype = autocast_dtype(device, args.precision)
    channels_last = args.channels_last if args.channels_last is not None else default_channels_last(device, amp_dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    log.info("launch %s: rank %d of %d on %s, precision %s, %s", env.launcher, env.rank, env.world_size, device,
             amp_dtype or "fp32", "channels_last" if channels_last else "contiguous")

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args, env.world_size, Normalize(memory_format=memory_format)).to(device,
                                                                                        memory_format=memory_format)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, start_step = 0, 0
    resume_from, run_id = runs.decided_by_rank0(
        lambda: (runs.resume_file(output_dir / checkpoint.LAST, args.resume, checkpoint.numbered(output_dir)[::-1]),
                 runs.new_run_id()), device)
    if resume_from is not None:
        ckpt = checkpoint.load(resume_from)  # the file rank 0 chose, on every rank
        check_recipe(ckpt, resume_from, args)
        run_id = ckpt.get("run_id") or run_id  # kept through resumes; older checkpoints had none
        try:
            model.load_state_dict(checkpoint.strip_prefix(ckpt["state_dict"]))
        except RuntimeError as exc:
            raise SystemExit(f"{resume_from}: does not fit this model (check --moco-k/--moco-dim/--mlp): "
                             f"{exc}") from exc
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
        if start_step:
            model.shuffle_generator.set_state(ckpt["shuffle_state"])
        log.info("resumed from %s at epoch %d step %d of %d epochs", resume_from, start_epoch, start_step,
                 args.epochs)
    log.info("run id %s", run_id)

    ddp_model = model
    if env.distributed:
        # No buffer broadcast: the queue is equal on every rank by construction, and BatchNorm statistics are
        # averaged at each epoch's end (average_running_stats); broadcasting would send the queue every step.
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    loader, sampler = build_loader(args, paths, env.rank, env.world_size, device)
    unreadable_files = UnreadableFiles(args.max_unreadable, device)
    watch = failures.LossWatch(device, 4, describe_logits)
    log.info("%d images in %s; %d steps an epoch of %d images", len(paths), paths[0].parent, len(loader),
             args.batch_size)

    probe = None
    if args.probe_data and args.probe_freq > 0 and env.is_main:
        probe = KnnProbe(args.probe_data, args.image_size, device, args.probe_k, args.probe_max_images, amp_dtype)
        log.info("kNN probe: %d training crops, %d validation crops, %d classes", len(probe.train_labels),
                 len(probe.val_labels), probe.num_classes)
        if start_epoch == 0:
            knn = probe(model.encoder_q)
            log.info("kNN top-1 at initialisation: %.2f%% (own BatchNorm statistics: %.2f%%)",
                     100 * knn["knn_top1"], 100 * knn["knn_top1_own_bn"])
            metrics_writer.write({"epoch": 0, **knn})

    def state(epochs_done: int, step: int = 0) -> dict:
        return {
            "epoch": epochs_done,
            "step": step,  # steps of the next epoch already trained: non-zero only in a mid-epoch checkpoint
            "run_id": run_id,
            "shuffle_state": model.shuffle_generator.get_state(),
            "arch": args.arch,
            "state_dict": state_dict_with_prefix(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "args": dict(vars(args)),
        }

    def save_epoch(done: int, record: dict) -> None:
        """Rank 0: the epoch's checkpoints and record; numbered checkpoints beyond the newest --keep go."""
        snapshot = state(done)
        checkpoint.save_atomic(snapshot, output_dir / checkpoint.LAST)
        if done % args.save_freq == 0 or done == args.epochs:
            checkpoint.save_atomic(snapshot, output_dir / checkpoint.numbered_name(done))
            for old in checkpoint.numbered(output_dir)[:-args.keep] if args.keep else ():
                old.unlink()
                log.info("removed %s (--keep %d)", old, args.keep)
        metrics_writer.write(record)

    for epoch in range(start_epoch, args.epochs):
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, skip=first_step * per_rank_batch)
        if not first_step:  # else the generator state came with the checkpoint
            model.shuffle_generator.manual_seed(args.seed * 100_003 + epoch)
        lr = learning_rate(epoch, args, (first_step + 1) / (first_step + len(loader)))  # its first step's
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            stats = train_one_epoch(ddp_model, loader, optimizer, scaler, amp_dtype, epoch, args, device,
                                    env.world_size, unreadable_files, watch, first_step)
        except (preemption.Preempted, TooManyUnreadable) as stop:
            step = stop.step  # the except clause unbinds ``stop``; the save below reads the step
            watch.check(epoch)  # a diverged run saves nothing
            average_running_stats(model)  # the ranks' own statistics, as at an epoch's end
            runs.decided_by_rank0(lambda: checkpoint.save_atomic(state(epoch, step), output_dir / checkpoint.LAST),
                                  device)
            raise
        average_running_stats(model)
        done = epoch + 1
        record = {"epoch": done, "lr": lr, **stats, "key_spread": key_spread(model.queue)}
        if probe is not None and (done % args.probe_freq == 0 or done == args.epochs):
            record.update(probe(model.encoder_q))
        # Rank 0 saves; the others wait for its outcome and stop with it when the save failed (at a barrier they
        # would wait out the collective timeout).
        runs.decided_by_rank0(lambda: save_epoch(done, record), device)
        log.info("epoch %d/%d done: lr %.4g loss %.4f acc@1 %.1f%% key spread %.2f %.1f img/s%s", done, args.epochs,
                 lr, record["loss"], record["acc1"], record["key_spread"], record["images_per_s"],
                 f" kNN top-1 {100 * record['knn_top1']:.2f}% (own BN {100 * record['knn_top1_own_bn']:.2f}%)"
                 if "knn_top1" in record else "")
    return model


if __name__ == "__main__":
    main()
