"""Data-loader workers that outlive Slurm's stop signals, and still end when their own process ends them.

Slurm signals every process of a job step, data-loader workers included: the time-limit warning (SIGUSR1, which
the batch script passes to srun; SIGUSR2 under submitit, whose --signal=USR2@... has no B: and so reaches every
process) and a preemption or requeue (SIGTERM). SIGUSR1's and SIGUSR2's default action kills a worker, and so does
SIGTERM through torch's worker handler; the main process then fails with "DataLoader worker ... is killed by
signal" instead of stopping at the next step with a checkpoint (moco.runtime.preemption), the only answer these signals
should get. A worker started by fork inherits the main process's handlers; under forkserver and spawn (Python
3.14's default is forkserver) it has none.

Ignoring SIGTERM in the workers is not enough: multiprocessing ends daemonic workers at interpreter exit with
SIGTERM and joins them without a timeout, so the exit after a stop (persistent workers still alive) would hang.
Here a worker keeps the three signals blocked and one thread takes them with sigwaitinfo: a SIGTERM from the main
process ends the worker with status 0, as torch's own handler does (a worker that dies of a signal is reported as
a failure); any other is dropped. The main process's own answer to each signal stays moco.runtime.preemption's (SIGUSR2
requests a stop only where the submitit launcher installs it).

The main process blocks the signals while it starts workers. A blocked signal stays blocked across fork and exec,
so a worker starts with them blocked, and a signal that arrives before its ``worker_init_fn`` runs (seconds of
imports under forkserver or spawn) waits instead of killing it; the main process takes its own pending signal once
the workers are started. The fork server and resource tracker started then keep the block too; a fork server that
other code started earlier does not, and its workers can die of a signal during their start-up.

Linux only (sigwaitinfo): where it is missing (macOS, never a Slurm node) ``DataLoader`` is torch's own.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
from multiprocessing import resource_tracker

import torch.utils.data

from .preemption import SIGNALS

WORKER_SIGNALS = (*SIGNALS, signal.SIGUSR2)  # SIGUSR2: submitit's time-limit signal


def _take_stop_signals(main_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(WORKER_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == main_pid:
            os._exit(0)


def _guard_worker(main_pid: int, worker_id: int) -> None:
    """``worker_init_fn``: the block is already in place when the worker was started by ``DataLoader``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(main_pid,), name="stop signals", daemon=True).start()


def original_message(exc: BaseException) -> str:
    """``str(exc)``, one line even when a worker raised it: torch re-raises a worker's exception as the same type
    with the worker's whole traceback as its message, whose last line is the original ``module.Type: message``."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    return text.rstrip("\n").rsplit("\n", 1)[-1].split(": ", 1)[-1]


class DataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader whose workers outlive SIGUSR1, SIGUSR2 and SIGTERM from anyone but the main process."""

    def __init__(self, *args, **kwargs):
        # The main process's pid, given: a forkserver worker's parent is the fork server.
        super().__init__(*args, worker_init_fn=functools.partial(_guard_worker, os.getpid()), **kwargs)

    def __iter__(self):
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)  # workers start here (persistent: once)
        try:
            if self.num_workers and (self.multiprocessing_context or multiprocessing).get_start_method() != "fork":
                # Forkserver and spawn workers need multiprocessing's resource tracker, which unblocks SIGTERM
                # once it has started it: start it first (it keeps the block), then block again.
                resource_tracker.ensure_running()
                signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


if not hasattr(signal, "sigwaitinfo"):
    DataLoader = torch.utils.data.DataLoader
