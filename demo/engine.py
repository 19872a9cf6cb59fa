"""One training epoch and sharded inference, shared by demo.train and demo.evaluate."""
from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist

from moco.runtime import failures, preemption
from moco.runtime.distributed import all_reduce_mean
from moco.runtime.logger import get_logger
from moco.runtime.precision import optimizer_step
from moco.runtime.progress import EpochProgress
from moco.runtime.unreadable import UnreadableFiles
from moco.runtime.workers import DataLoader

from .datasets import DetectionSet, collate
from .recipe import warmup_factor
from .sampler import eval_batches

log = get_logger(__name__)


def to_device(images, targets, device: torch.device):
    """uint8 images become [0, 1] floats on the device; tv_tensors become plain tensors for the detector."""
    images = [img.as_subclass(torch.Tensor).to(device, non_blocking=True).float().div_(255) for img in images]
    if targets is not None:
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device, non_blocking=True),
                    "labels": t["labels"].to(device, non_blocking=True)} for t in targets]
    return images, targets


def stage_schedule(optimizer: torch.optim.Optimizer, lr: float, warmup_iters: int, saved: dict | None = None,
                   lr_asked: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A stage's lr: linear warm-up over ``warmup_iters`` steps to ``lr``, then constant. Resumed from ``saved`` (the
    scheduler's state in the stage's own checkpoint), the step count and the base lr come back, and the optimizer
    is set where the warm-up stood; ``lr_asked`` (an explicit --lr) replaces the saved base lr, so the resumed
    stage goes on at the new one."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: warmup_factor(it, warmup_iters))
    if saved is None:
        return scheduler
    scheduler.load_state_dict(saved)  # the step count and base lrs; the optimizer's lr is set below
    if lr_asked is not None:
        scheduler.base_lrs = [lr_asked] * len(scheduler.base_lrs)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * warmup_factor(scheduler.last_epoch, warmup_iters)
    return scheduler


def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp_dtype, device, epoch: int,
                    print_freq: int, unreadable_files: UnreadableFiles, first_step: int = 0) -> dict:
    """The epoch's steps from ``first_step`` on (non-zero when resumed mid-epoch) over a ``ReplacingUnreadable``
    loader; raises ``Preempted`` on a stop, ``TooManyUnreadable`` past --max-unreadable. Losses are averaged over
    the steps run here."""
    model.train()
    unreadable_files.start_epoch()
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    steps = first_step + len(loader)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    progress = EpochProgress(log, epoch, steps, first_step, print_freq)
    for step, (images, targets, failed, errors) in enumerate(loader, first_step):
        if preemption.stop_requested(device, step):
            raise preemption.Preempted(step)
        unreadable_files.update(step, failed, errors)
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        # One read of all the losses a step, for the statistics (torchvision's samplers wait for the GPU several
        # times a step anyway). The finiteness check, one flag all_reduced under DDP, comes before backward.
        values = dict(zip(["loss", *loss_dict], torch.stack([loss, *loss_dict.values()]).detach().float().tolist()))
        failures.check_loss(loss, epoch, step, lambda: ", ".join(f"{k} {v.item():.4g}" for k, v in loss_dict.items()))
        if optimizer_step(loss, optimizer, scaler):  # a step fp16's GradScaler skipped leaves the warm-up where it was
            scheduler.step()
        seen += len(images)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * len(images)
        progress.update(step, len(images) * world,
                        lambda: f"loss {values['loss']:.4f} lr {optimizer.param_groups[0]['lr']:.3g}")
    elapsed = time.perf_counter() - start
    stats = {k: all_reduce_mean(v / max(seen, 1), device) for k, v in sorted(sums.items())}
    stats["images_per_s"] = seen * world / elapsed
    stats["unreadable_images"] = unreadable_files.epoch_count()
    return stats


@torch.no_grad()
def predict(model, dataset: DetectionSet, device: torch.device, amp_dtype, batch_size: int, workers: int,
            rank: int = 0, world_size: int = 1) -> dict[int, dict] | None:
    """Detections for every image of ``dataset``, keyed by image id, on rank 0 (None on the others).

    Each rank runs its share of fixed batches (see ``eval_batches``); rank 0 gathers them. A stop request
    (``moco.runtime.preemption``) raises ``Preempted`` at the next batch polled, the batch number as its step.
    ``dataset`` is any with ``aspect_ratios()`` and ``(image, {"image_id": ...})`` items. One that skips files it
    cannot read (demo.predict's, never a labeled split) gives ``None`` for the image and the reason as the target's
    ``error``; that image's entry is then ``{"error": reason}``."""
    was_training = model.training
    model.eval()
    batches = eval_batches(dataset.aspect_ratios(), batch_size, rank, world_size)
    # The polls are collectives: every rank makes as many as rank 0 has batches (some ranks have one fewer).
    polls = len(eval_batches(dataset.aspect_ratios(), batch_size, 0, world_size))
    # A loader draws its workers' seed from the generator it is given, the global one by default: that one also
    # draws the training's flips and the heads' samples, which validating must leave as they were.
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    mine = {}
    for batch, data in itertools.zip_longest(range(polls), loader):
        if preemption.stop_requested(device, batch):
            log.warning("inference stopped at batch %d of %d", batch, polls)
            raise preemption.Preempted(batch)
        if data is None:  # this rank's batches are done
            continue
        images, targets = data
        mine.update((t["image_id"], {"error": t["error"]}) for image, t in zip(images, targets) if image is None)
        read = [(image, t) for image, t in zip(images, targets) if image is not None]
        if not read:
            continue
        images, _ = to_device([image for image, _ in read], None, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        for (_, target), out in zip(read, outputs):
            mine[target["image_id"]] = {k: (v.float() if v.is_floating_point() else v).cpu()
                                        for k, v in out.items()}
    model.train(was_training)
    if world_size == 1:
        return mine
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    return {image_id: out for part in gathered for image_id, out in part.items()}
