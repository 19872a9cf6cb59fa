"""How often pretraining's steps make the host wait for the GPU, and where (a row of ``make gpu-check``).

Under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call (``.item()``, a blocking copy, a
boolean mask, ...) raises a warning. Each is recorded with the step it fell in, the call that raised it and the
innermost frame of this repository's code above it. moco.train's loop is meant to wait only at LossWatch's
periodic check (every ``LossWatch.EVERY`` steps); with fp16 the GradScaler also reads its overflow flag every step,
which is how it decides whether to apply the step.
"""
from __future__ import annotations

import argparse
import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moco import train as moco_train
from moco.augment import Normalize
from moco.data import find_unlabeled_images
from moco.runtime import failures
from moco.runtime.devices import configure_backends
from moco.runtime.unreadable import UnreadableFiles

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "called a synchronizing CUDA operation"  # torch's text (c10/cuda), the start of every such warning
_SCALER_FILE = "torch/amp/grad_scaler.py"


@dataclass(frozen=True)
class Sync:
    step: int | str  # the step it fell in, or "start" / "end" of the epoch, outside every step
    call: str  # file:line of the Python call that synchronised
    where: str  # the innermost frame of this repository's code above it, "file:line in function"
    scaler: bool  # raised inside the GradScaler


def _in_repository(filename: str) -> str | None:
    """The path relative to the repository, for this repository's code (its virtualenv aside); else None."""
    try:
        relative = Path(filename).resolve().relative_to(ROOT)
    except (ValueError, OSError):
        return None
    return None if relative.parts[0] == ".venv" else str(relative)


def _short(filename: str) -> str:
    return _in_repository(filename) or filename.split("site-packages/", 1)[-1]


class StepCounted:
    """A loader whose iteration tells ``counter`` which step is running (the loop asks for a step's batch first)."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter = loader, counter

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for step in range(len(self.loader)):  # the step is set before its batch is fetched: the fetch is its own
            self.counter.step = step
            yield next(batches)
        self.counter.step = "end"


class SyncCounter:
    def __init__(self):
        self.step: int | str = "start"
        self.syncs: list[Sync] = []

    def steps(self, loader) -> StepCounted:
        return StepCounted(loader, self)

    def record(self, filename: str, lineno: int) -> None:
        stack = [f for f in traceback.extract_stack()
                 if not f.filename.endswith("warnings.py") and Path(f.filename).resolve() != Path(__file__).resolve()]
        ours = [f for f in stack if _in_repository(f.filename)]
        where = f"{_short(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}" if ours else "outside this code"
        self.syncs.append(Sync(self.step, f"{_short(filename)}:{lineno}", where,
                               any(_short(f.filename) == _SCALER_FILE for f in stack)))

    @contextlib.contextmanager
    def watching(self, device: torch.device) -> Iterator[SyncCounter]:
        """Records the synchronisations inside; other warnings are shown as usual. Without CUDA nothing is raised,
        and the code around it runs the same."""
        cuda = device.type == "cuda"
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=MESSAGE)  # every one, not once per line
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if str(message).startswith(MESSAGE):
                    self.record(filename, lineno)
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")


def judge(syncs: list[Sync], steps: int, warmup: int, check_every: int, scaler_allowed: bool) -> dict:
    """The figures of a run of ``steps`` steps: counts in the warm-up (the first ``warmup`` steps), in the steady
    state after it and outside the steps, by origin; and the steady steps that waited more than allowed: once at
    LossWatch's check steps (multiples of ``check_every``), never at the others, the GradScaler's reads aside when
    ``scaler_allowed`` (fp16)."""
    in_steps = [s for s in syncs if isinstance(s.step, int)]
    steady = [s for s in in_steps if s.step >= warmup]
    counted = [s for s in steady if not (scaler_allowed and s.scaler)]
    per_step = Counter(s.step for s in counted)
    offending = sorted(step for step, n in per_step.items() if n > (1 if step % check_every == 0 else 0))
    origins = Counter((s.where, s.call) for s in syncs)
    return {
        "steps": steps, "warmup_steps": warmup, "check_every": check_every,
        "total": len(syncs),
        "warmup": sum(s.step < warmup for s in in_steps),
        "steady": len(steady),
        "steady_per_step": len(steady) / max(steps - warmup, 1),
        "steady_at_check_steps": sum(s.step % check_every == 0 for s in counted),
        "steady_scaler": sum(s.scaler for s in steady),
        "outside_steps": len(syncs) - len(in_steps),
        "offending_steps": offending,
        "origins": [{"where": where, "call": call, "count": n,
                     "steps": sorted({str(s.step) for s in syncs if (s.where, s.call) == (where, call)})[:10]}
                    for (where, call), n in origins.most_common()],
    }


def pretraining_steps(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None,
                      steps: int) -> tuple[torch.nn.Module, dict, SyncCounter]:
    """``steps`` steps of moco.train's epoch loop on ``device`` as the trainer sets it up (its loader over the
    data, its backends, layout and GradScaler), with the synchronisations recorded. Returns the model, the epoch's
    statistics and the counter."""
    paths = find_unlabeled_images(args.data)
    if len(paths) < steps * args.batch_size:
        raise ValueError(f"{args.data}: {len(paths)} images cannot fill {steps} batches of {args.batch_size}")
    configure_backends(device, fixed_shapes=True)
    memory_format = (torch.channels_last if moco_train.default_channels_last(device, amp_dtype)
                     else torch.contiguous_format)
    torch.manual_seed(args.seed)
    model = moco_train.build_model(args, 1, Normalize(memory_format=memory_format)).to(device,
                                                                                     memory_format=memory_format)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loader, sampler = moco_train.build_loader(args, paths[:steps * args.batch_size], 0, 1, device)
    sampler.set_epoch(0)
    model.shuffle_generator.manual_seed(args.seed)
    unreadable_files = UnreadableFiles(args.max_unreadable, device)
    watch = failures.LossWatch(device, 4, moco_train.describe_logits)
    counter = SyncCounter()
    with counter.watching(device):
        stats = moco_train.train_one_epoch(model, counter.steps(loader), optimizer, scaler, amp_dtype, 0, args,
                                           device, 1, unreadable_files, watch)
    return model, stats, counter
