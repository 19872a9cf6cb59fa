"""Training images that cannot be read: each replaced, logged, counted, and a ceiling past which the run stops.

A training sample whose file cannot be decoded (``moco.course.images.UnreadableImage``: truncated, empty, not an image)
is replaced by the next readable sample of the dataset (index + 1, index + 2, ..., wrapping around), so a run
depends only on its seed and on which files are bad: the same with any number of workers, and across resumes
(pretraining augments the replacement with the original sample's seed). A dataset returns, after each sample, the
index whose file failed (-1: none) and the error; the training loop hands them to ``UnreadableFiles``, which logs
each file once per process and counts the epoch's files for its record (``unreadable_images``).

Past ``--max-unreadable`` distinct files the data is broken rather than noisy: the run stops with a mid-epoch
checkpoint, as on a stop signal, lists the files, and exits with ``EXIT_DATAERR``, which the Slurm scripts do not
requeue (a requeued job would meet the same files). The ranks agree at the stop poll's cadence
(``moco.runtime.preemption.POLL_STEPS``), so they stop at the same step. A sample followed by more than
``--max-unreadable`` + 1 unreadable files in a row ends the run at once, with an error naming the first of them.

Validation, evaluation and the kNN probe never replace an image: that would change their score without a word.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..course.images import UnreadableImage
from .distributed import all_reduce_mean
from .logger import get_logger
from .preemption import POLL_STEPS

log = get_logger(__name__)

T = TypeVar("T")
# sysexits.h EX_DATAERR: the input data was incorrect. Not EXIT_REQUEUE: a requeued job would meet the same files.
EXIT_DATAERR = 65
DEFAULT_MAX_UNREADABLE = 100


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of files, 0 or more")
    return int(text)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-unreadable", default=DEFAULT_MAX_UNREADABLE, type=_count, metavar="N",
        help="training images that cannot be read are each replaced by the next readable one and logged; once more "
             f"than N distinct files have failed, the run stops with a checkpoint and exit status {EXIT_DATAERR}. "
             "A few damaged files are noise worth training through; many more mean a broken copy or disk, better "
             "fixed than trained around")


def first_readable(read: Callable[[int], T], index: int, size: int, limit: int) -> tuple[T, int, str]:
    """``read(index)``, or where that raises ``UnreadableImage``, ``read`` of the next index that does not (modulo
    ``size``), trying at most ``limit + 1`` others: one more than the ceiling (``limit``), so that a replacement
    found within them leaves the stop to the ceiling, with its checkpoint; and a long broken stretch of a dataset
    does not cost a scan of all of it per sample. Returns the value, the index whose file failed (-1: none) and
    its error."""
    error = ""
    tries = min(limit + 1, size - 1) + 1
    for offset in range(tries):
        try:
            return read((index + offset) % size), (index if offset else -1), error
        except UnreadableImage as exc:
            error = error or str(exc)
    raise UnreadableImage(f"{error}; nor can any of the {tries - 1} images after it be read: check the data "
                          f"with python -m demo.check")


class TooManyUnreadable(Exception):
    """Raised by a training loop at the step where the ranks agreed that too many files failed; the checkpoint is
    the caller's job, as for ``moco.runtime.preemption.Preempted``."""

    def __init__(self, step: int, errors: dict[int, str], ceiling: int):
        listing = "".join(f"  {errors[index]}\n" for index in sorted(errors))
        super().__init__(
            f"{len(errors)} training images cannot be read, more than --max-unreadable {ceiling}:\n{listing}"
            f"Stopped before step {step} of the epoch, with a checkpoint. Fix or remove these files (python -m "
            f"demo.check lists every unreadable file of a dataset), then run the same command again to continue "
            f"from that step; or raise --max-unreadable to train on, each of them replaced by the next readable "
            f"image.")
        self.step = step


class UnreadableFiles:
    """What this process's training batches report of unreadable files: logs each file once, counts an epoch's
    files, and raises ``TooManyUnreadable`` once the ranks together have found more than ``ceiling``."""

    def __init__(self, ceiling: int, device: torch.device):
        self.ceiling, self.device = ceiling, device
        self.distributed = dist.is_available() and dist.is_initialized()
        self.logged: set[int] = set()  # found by this process during the run
        self.epoch: set[int] = set()  # found by this process during the epoch
        self.agreed: dict[int, str] = {}  # index -> error, found by any rank as of the last agreement
        self.unshared: dict[int, str] = {}  # found here since then

    def start_epoch(self) -> None:
        self.epoch = set()

    def update(self, step: int, failed: Iterable[int], errors: Iterable[str]) -> None:
        """A batch's report (index whose file failed, -1 for none, and error per sample), before the step trains.
        The ranks agree at every step in a single process, every ``POLL_STEPS`` steps under DDP."""
        for index, error in zip(failed, errors):
            if index < 0:
                continue
            self.epoch.add(index)
            if index not in self.logged:
                self.logged.add(index)
                self.unshared[index] = error
                log.warning("%s; replaced by the next readable image (each unreadable file is logged once)", error)
        if self.distributed:
            if step % POLL_STEPS:
                return
            self._share()
        else:
            self.agreed.update(self.unshared)
            self.unshared = {}
        if len(self.agreed) > self.ceiling:
            raise TooManyUnreadable(step, self.agreed, self.ceiling)

    def _share(self) -> None:
        """Every rank learns the files the others found: one small collective, and a gather only when one is new."""
        new = torch.tensor([len(self.unshared)], device=self.device)
        dist.all_reduce(new, op=dist.ReduceOp.MAX)
        if new.item():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.unshared)
            for part in parts:
                self.agreed.update(part)
            self.unshared = {}

    def epoch_count(self) -> int:
        """Distinct files found unreadable during the epoch on all ranks: a collective. Exact, since an epoch's
        samples are disjoint among ranks (demo's sampler pads with up to world size - 1 repeats, which can count
        a file twice)."""
        world = dist.get_world_size() if self.distributed else 1
        return round(all_reduce_mean(float(len(self.epoch)), self.device) * world)


def exit_after(stop: TooManyUnreadable, is_main: bool) -> SystemExit:
    """The exit once the stop's checkpoint is saved: the message, from rank 0 only (every rank knows the same
    files), then ``EXIT_DATAERR``."""
    if is_main:
        log.error("%s", stop)
    return SystemExit(EXIT_DATAERR)
