"""How a training run ends when it cannot go on, with an exit status for each way, shared by both trainers.

Exit statuses of moco.train and demo.train (sysexits.h numbers):
- 0: done, or nothing left to do.
- 1: an error to fix before running again, said in one line ("error: ..."); or a bug, with its traceback.
- 2, ``EXIT_USAGE``: a request that would train nothing (``UsageError``: a stage that would end before it starts,
  a batch larger than the data), said in one line before any data is read, as argparse refuses a bad flag.
- 65 (EX_DATAERR), ``moco.runtime.unreadable.EXIT_DATAERR``: more training images could not be read than
  --max-unreadable allows; stopped with a mid-epoch checkpoint, the files listed. Not requeued: the same files
  would stop it again.
- 70 (EX_SOFTWARE), ``EXIT_DIVERGED``: the loss was not finite on some rank. Every rank stops together, and nothing
  is saved after that step: fine-tuning stops at that step, before its backward pass; pretraining, whose steps
  never wait for the GPU, within ``LossWatch.EVERY`` steps of it. Not requeued by the Slurm scripts: the same seeded
  run would diverge again at the same step.
- 74 (EX_IOERR), ``EXIT_IOERR``: a checkpoint could not be written (a full disk, a quota); the previous one is
  intact. Not requeued either: a requeue into a full disk would churn.
- 75 (EX_TEMPFAIL), ``moco.runtime.preemption.EXIT_REQUEUE``: stopped by a signal with a checkpoint, to be requeued.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..course.images import UnreadableImage
from . import checkpoint, preemption, unreadable
from .logger import get_logger
from .workers import original_message

log = get_logger(__name__)

EXIT_USAGE = 2
EXIT_DIVERGED = 70
EXIT_IOERR = 74


class UsageError(ValueError):
    """A request that parses but would train nothing (see the module doc)."""


class NonFiniteLoss(Exception):
    """Raised on every rank, with the same message, once any rank's loss was not finite (see the module doc)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _stop_everywhere(bad: torch.Tensor, report: Callable[[], tuple[int, str, str]], epoch: int) -> None:
    """Raise ``NonFiniteLoss`` on every rank when ``bad`` (a flag on the device) is set on any: the message names
    the first step and each rank that saw one, from ``report()`` -> (step, loss, details) on those ranks."""
    anywhere = bad.reshape(1).int()
    if _distributed():
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    if not anywhere.item():
        return
    mine = report() if bad.item() else None
    reports = [mine and (mine[0], f"{mine[1]} ({mine[2]})")]
    if _distributed():  # every rank raises the same message, naming the ranks that saw it
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
        reports = [r and (r[0], f"{r[1]} on rank {rank} ({r[2]})") for rank, r in enumerate(reports)]
    reports = sorted(filter(None, reports))
    first = reports[0][0]
    said = [what if step == first else f"{what} from step {step}" for step, what in reports]
    raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {first}: {'; '.join(said)}")


def check_loss(loss: torch.Tensor, epoch: int, step: int, details: Callable[[], str]) -> None:
    """Raise ``NonFiniteLoss`` on every rank, with the same message, when the loss of any rank is not finite.

    Call it between the forward pass and ``backward``: DDP averages the gradients inside ``backward``, so a NaN on
    one rank would reach every rank's weights. ``details()`` describes the loss (its components); it is called only
    on the ranks whose loss is not finite. It reads a flag to the host: for loops that wait for the GPU every step
    anyway (detection's); MoCo's uses ``LossWatch``."""
    bad = ~torch.isfinite(loss.detach())
    _stop_everywhere(bad, lambda: (step, f"{loss.item():.4g}", details()), epoch)


class LossWatch:
    """Non-finite losses seen on the device, step by step, and read by the host only every ``EVERY`` steps and
    before anything is saved (``check``), so that no step waits for the GPU. A non-finite step's weights may reach
    the next few steps, but never a checkpoint. The first such step of this rank is kept: its number, its loss and
    the caller's figures about it, described at the check by ``describe(figures)``."""

    EVERY = preemption.POLL_STEPS  # the stop poll's cadence: the host waits for the GPU at those steps anyway

    def __init__(self, device: torch.device, figures: int, describe: Callable[[Sequence[float]], str]):
        self.describe = describe
        # [step + 1 (0 while none was seen), loss, figures...]
        self.first = torch.zeros(2 + figures, dtype=torch.float64, device=device)

    def observe(self, step: int, loss: torch.Tensor, figures: torch.Tensor) -> None:
        """Record ``loss`` (and ``figures``, a tensor of the caller's numbers) if it is this rank's first
        non-finite one; no read to the host."""
        with torch.no_grad():
            seen = torch.cat([torch.full((1,), step + 1.0, dtype=torch.float64, device=loss.device),
                              loss.detach().double().reshape(1), figures.double().reshape(-1)])
            new = ~torch.isfinite(loss.detach()) & (self.first[0] == 0)
            self.first.copy_(torch.where(new, seen, self.first))

    def due(self, step: int) -> bool:
        return step % self.EVERY == 0

    def check(self, epoch: int) -> None:
        """Raise ``NonFiniteLoss`` on every rank when any rank has seen a non-finite loss: a collective, every rank at
        the same step."""
        def report() -> tuple[int, str, str]:
            step, loss, *figures = self.first.tolist()
            return int(step) - 1, f"{loss:.4g}", self.describe(figures)

        _stop_everywhere(self.first[0] > 0, report, epoch)


def _kept(last: Path) -> str:
    """What a stopped run leaves to continue from: its ``checkpoint_last``, untouched since the last good step."""
    try:
        ckpt = checkpoint.load(last, mmap=True)
    except (FileNotFoundError, checkpoint.UnreadableCheckpoint):
        return "nothing was saved since it started"
    step = f", step {ckpt['step']}" if ckpt.get("step") else ""
    return f"{last.name} (epoch {ckpt.get('epoch')}{step}) is intact"


def _ending(exc: BaseException, last: Path) -> SystemExit | None:
    """The exit for ``exc``, its message logged; None for an error that keeps its traceback."""
    if isinstance(exc, UsageError):
        sys.stderr.write(f"error: {exc}\n")
        return SystemExit(EXIT_USAGE)
    if isinstance(exc, (FileNotFoundError, ValueError, UnreadableImage)):  # the user's to fix: no traceback
        return SystemExit(f"error: {original_message(exc)}")
    if isinstance(exc, unreadable.TooManyUnreadable):
        return unreadable.exit_after(exc, not dist.is_initialized() or dist.get_rank() == 0)
    if isinstance(exc, preemption.Preempted):
        log.warning("%s: checkpoint saved, exiting with status %d to be requeued", exc, preemption.EXIT_REQUEUE)
        return SystemExit(preemption.EXIT_REQUEUE)
    if isinstance(exc, checkpoint.WriteError):
        log.error("%s (exit status %d)", exc, EXIT_IOERR)
        return SystemExit(EXIT_IOERR)
    if isinstance(exc, NonFiniteLoss):
        log.error("%s: the run stopped and saved nothing after it; %s. Try a lower --lr (exit status %d)", exc,
                  _kept(last), EXIT_DIVERGED)
        return SystemExit(EXIT_DIVERGED)
    return None


def _release_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames that ``exc`` and the errors behind it passed through."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def exit_statuses(last: Path) -> Iterator[None]:
    """The trainers' errors as their exit statuses, each with one message; ``last``: the run's checkpoint_last.

    Whatever the error, the frames it passed through let go of the training's objects, so that
    ``moco.runtime.distributed.cleanup_distributed`` can free the DDP model before it leaves the process group."""
    try:
        yield
    except BaseException as exc:
        _release_frames(exc)
        ending = _ending(exc, last)
        if ending is None:
            raise
        raise ending from exc
