"""The harness both trainers' ``main`` run in, so that pretraining and each detection stage start, fail and end alike.

In order: the process group (``distributed.init_distributed``: torchrun, Slurm or one process); rank 0 claims the run
directory for every rank (its ``run.lock``, and whatever else the trainer's ``claim`` does first); the log goes to
``<run_dir>/train.log`` from then on, so a job refused by another's lock writes nothing into that job's log; every
error leaves as its exit status (``failures.exit_statuses``); metrics go through one writer. On the way out, however
the training ended, the lock and the process group are released.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import checkpoint, failures, runs
from .distributed import DistEnv, cleanup_distributed, init_distributed
from .logger import setup_logging
from .metrics import MetricsWriter
from .runlock import DirectoryLock

T = TypeVar("T")


def run_training(run_dir: Path, device: str, train: Callable[[DistEnv, MetricsWriter, object], T],
                 claim: Callable[[DirectoryLock], object] | None = None) -> T:
    """``train(env, metrics_writer, claimed)`` inside the harness; ``claimed``: what rank 0's ``claim(lock)``
    returned (it must take the lock), or None with the lock alone. ``device``: the trainers' --device."""
    env = init_distributed(device)
    lock = DirectoryLock(run_dir)
    setup_logging(env.rank)  # the console only, until the directory is this run's
    try:
        with failures.exit_statuses(run_dir / checkpoint.LAST):
            claimed = runs.decided_by_rank0(lambda: claim(lock) if claim else lock.acquire(), env.device)
            setup_logging(env.rank, run_dir / "train.log")
            with MetricsWriter(run_dir, env.rank) as metrics_writer:
                return train(env, metrics_writer, claimed)
    finally:
        lock.release()
        cleanup_distributed()
