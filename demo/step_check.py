"""One MoCo step in two set-ups from the same weights and batch, and how far apart they end: the comparisons of
``make gpu-check`` (demo.gpu_check). A step is moco.train's (``moco_step``) on a model built as moco.train builds
it; the figures are its logits and loss, the queue after it, the SGD update of the query encoder and the BatchNorm
running statistics.

Two comparisons use it. A device against the CPU in fp32, which checks the device's kernels and the step's device
code (the shuffle, the queue) at once. And two ranks under DDP against one process over the whole batch: the ranks
normalise their own halves (queries) and the halves the shuffle deals them (keys); one process with split
BatchNorm of 2 groups does the same when its sub-batches are those halves, which in channels_last they are (the
k-th contiguous block of the batch, see moco.batchnorm), so both run channels_last.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from moco import train as moco_train
from moco.augment import Normalize
from moco.data import find_unlabeled_images
from moco.runtime import failures
from moco.runtime.distributed import average_running_stats
from moco.runtime.precision import true_fp32

# The check's MoCo: small enough for seconds on a CPU, with every part of the v2 recipe (MLP head, aug+, split BN).
SMALL = ("-a", "resnet18", "--image-size", "64", "--moco-k", "256", "--mlp", "--moco-t", "0.2", "--aug-plus",
         "--lr", "0.03", "--wd", "1e-4", "-p", "0")
SHUFFLE_SEED = 0
# Largest differences allowed. fp32 against fp32 (the CPU reference, or two ranks against one process) differs only
# in the order of sums (cuDNN's algorithms, threads, the all-reduce): far below these for logits, queue and running
# statistics, which a wrong kernel or a wrong shuffle moves by a good part of their range. The update is the loosest
# figure: at initialisation InfoNCE's gradient is a sum of near-cancelling terms, and split BatchNorm's small groups
# subtract means again, so rounding the logits' last bits already moves it by a visible share of its size (a
# different shuffle changes all of it). Mixed precision against fp32: bf16 keeps 8 significant bits (fp16 11), which
# move the logits well past fp32's rounding and the update by a large share of its size; these tolerances catch a
# wrong result, not bf16.
TOLERANCES = {
    "fp32": {"logits": 5e-3, "loss": 1e-3, "queue": 2e-3, "update": 0.2, "running": 1e-3},
    "mixed": {"logits": 0.2, "loss": 0.02, "queue": 0.05, "update": 0.8, "running": 0.05},
}


def step_args(data: str | Path, batch: int, bn_splits: int) -> argparse.Namespace:
    return moco_train.get_parser().parse_args([str(data), *SMALL, "-b", str(batch), "--bn-splits", str(bn_splits),
                                               "-j", "0"])


def first_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uint8 views of moco.train's first batch of the data, as its loader makes them (on the CPU)."""
    paths = find_unlabeled_images(args.data)
    loader, sampler = moco_train.build_loader(args, paths[:args.batch_size], 0, 1, torch.device("cpu"))
    sampler.set_epoch(0)
    (im_q, im_k), _, _ = next(iter(loader))
    return im_q, im_k


def initial_state(args: argparse.Namespace, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return moco_train.build_model(args, 1).state_dict()


@dataclass
class StepResult:
    loss: float
    logits: torch.Tensor
    queue: torch.Tensor
    update: dict[str, torch.Tensor]  # parameter -> its change in the step, for the query encoder
    running: dict[str, torch.Tensor] = field(default_factory=dict)
    updated: bool = True  # False when a GradScaler skipped the step (its scale too high for fp16)


def run_step(args: argparse.Namespace, state: dict, views: tuple[torch.Tensor, torch.Tensor], device: torch.device,
             amp_dtype: torch.dtype | None, world_size: int = 1, init_scale: float = 2.0**16) -> StepResult:
    """One training step of a model built from ``state`` (for ``world_size`` ranks: under DDP when > 1, the process
    group already joined), on ``views`` (this rank's uint8 batch), in channels_last: moco.train's layout on GPUs,
    and the one whose split BN groups are contiguous blocks of the batch."""
    memory_format = torch.channels_last
    model = moco_train.build_model(args, world_size, Normalize(memory_format=memory_format))
    model.load_state_dict(state)
    model.to(device, memory_format=memory_format)
    model.shuffle_generator.manual_seed(SHUFFLE_SEED)
    trained = model
    if world_size > 1:  # as moco.train wraps it
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else
                                                      None, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale) if amp_dtype == torch.float16 else None
    watch = failures.LossWatch(device, 4, moco_train.describe_logits)
    loss, logits, _ = moco_train.moco_step(trained, *views, optimizer, scaler, amp_dtype, device, watch, 0)
    watch.check(0)
    average_running_stats(model)
    updated = scaler is None or scaler.get_scale() >= init_scale
    before = {name[len("encoder_q."):]: value for name, value in state.items() if name.startswith("encoder_q.")}
    return StepResult(
        loss=float(loss.detach()), logits=logits.detach().float().cpu(), queue=model.queue.detach().float().cpu(),
        update={name: p.detach().float().cpu() - before[name].float()
                for name, p in model.encoder_q.named_parameters()},
        running={name: b.detach().float().cpu() for name, b in model.encoder_q.named_buffers()
                 if name.endswith(("running_mean", "running_var"))},
        updated=updated)


def _worst(values: list[float]) -> float:
    """The largest, NaN first: Python's max would pass over a NaN that comes second."""
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)


def differences(result: StepResult, reference: StepResult, rows: slice = slice(None)) -> dict[str, float]:
    """How far ``result`` is from ``reference`` (whose logits' ``rows`` it holds): largest absolute difference of the
    logits, of the loss and of the queue; the update's error relative to the reference update's size, over all
    parameters; the BatchNorm running statistics' largest error relative to their largest value."""
    update_error = sum(float((result.update[n] - u).pow(2).sum()) for n, u in reference.update.items())
    update_size = sum(float(u.pow(2).sum()) for u in reference.update.values())
    running = [float((result.running[n] - r).abs().max() / r.abs().max().clamp_min(1e-12))
               for n, r in reference.running.items()]
    return {"logits": float((result.logits - reference.logits[rows]).abs().max()),
            "loss": abs(result.loss - reference.loss),
            "queue": float((result.queue - reference.queue).abs().max()),
            "update": math.sqrt(update_error / max(update_size, 1e-30)),
            "running": _worst(running)}


def within(measured: dict[str, float], tolerance: dict[str, float]) -> list[str]:
    """The figures beyond their tolerance (NaN is beyond any)."""
    return [name for name, value in measured.items() if not value <= tolerance[name]]


def fp16_step(args, state, views, device) -> tuple[StepResult, float]:
    """An fp16 step that the GradScaler took: as the trainer's scaler does over its first steps, the scale halves
    until the gradients fit in fp16; each try starts from the same weights."""
    scale = 2.0**16
    for _ in range(32):
        result = run_step(args, state, views, device, torch.float16, init_scale=scale)
        if result.updated:
            return result, scale
        scale /= 2
    raise RuntimeError(f"the GradScaler skipped every fp16 step down to scale {scale:g}: the gradients are not finite")


def cpu_reference(args, state, views) -> StepResult:
    """The step on the CPU in fp32, in the layout of the GPU runs it stands for (split BN's groups depend on it)."""
    return run_step(args, state, views, torch.device("cpu"), None)


def compare_devices(args, state, views, device: torch.device, amp_dtype: torch.dtype | None,
                    reference: StepResult) -> dict:
    """One step on ``device`` in ``amp_dtype`` (None: fp32) against ``cpu_reference``: the same weights, batch,
    shuffle and layout."""
    scale = None
    if amp_dtype == torch.float16:
        result, scale = fp16_step(args, state, views, device)
    else:
        result = run_step(args, state, views, device, amp_dtype)
    measured = differences(result, reference)
    tolerance = TOLERANCES["fp32" if amp_dtype is None else "mixed"]
    return {"measured": measured, "tolerance": tolerance, "beyond": within(measured, tolerance),
            "loss": result.loss, "reference_loss": reference.loss, **({"fp16_scale": scale} if scale else {})}


# ---- two ranks against one process

def _rank_main(rank: int, world_size: int, backend: str, rendezvous: str, payload: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world_size,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        data = torch.load(payload, weights_only=False)
        args, views = data["args"], data["views"]
        per_rank = args.batch_size // world_size
        mine = tuple(v[rank * per_rank:(rank + 1) * per_rank] for v in views)
        with ieee_fp32(device):
            result = run_step(args, data["state"], mine, device, None, world_size)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ieee_fp32(device: torch.device):
    """IEEE fp32 for convolutions and matmuls: cuDNN's default TF32 would swamp the differences looked for."""
    return true_fp32(device.type)


def compare_ranks(args, state, views, device_type: str, world_size: int = 2, timeout_s: float = 300.0) -> dict:
    """``world_size`` ranks (NCCL on GPUs 0.., gloo on the CPU), each with its share of the batch, against one
    process with split BN in ``world_size`` groups over the whole batch, both in fp32 and channels_last."""
    single = step_args(args.data, args.batch_size, world_size)
    reference_device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    with ieee_fp32(reference_device):
        reference = run_step(single, state, views, reference_device, None)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ranks-") as tmp:
        payload = str(Path(tmp) / "payload.pt")
        torch.save({"args": args, "state": state, "views": views}, payload)
        context = mp.start_processes(
            _rank_main, args=(world_size, "nccl" if device_type == "cuda" else "gloo",
                              f"file://{Path(tmp) / 'rendezvous'}", payload, tmp),
            nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                raise TimeoutError(f"the {world_size} ranks did not finish their step within {timeout_s:.0f} s")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    per_rank = args.batch_size // world_size
    each = [differences(result, reference, slice(rank * per_rank, (rank + 1) * per_rank))
            for rank, result in enumerate(results)]
    measured = {name: _worst([d[name] for d in each]) for name in each[0] if name != "loss"}
    measured["loss"] = abs(sum(r.loss for r in results) / world_size - reference.loss)
    tolerance = TOLERANCES["fp32"]
    return {"measured": measured, "tolerance": tolerance, "beyond": within(measured, tolerance),
            "loss": reference.loss, "rank_losses": [r.loss for r in results]}
