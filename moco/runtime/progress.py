"""Where a training epoch stands: a line redrawn in place on an interactive terminal, log lines elsewhere.

On a terminal (stdout, where the log's console lines go, a TTY), rank 0 redraws one line a few times a second:
step/steps, images/s, time left, and the loss of the last --print-freq step. A Slurm log or a pipe would fill up
with the redrawn lines, so there the --print-freq log lines stay the only ones, as before. Both trainers log those
lines through here either way; on a terminal they go to train.log only (see moco.runtime.logger), where the redrawn line
stands in for them.
"""
from __future__ import annotations

import datetime
import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch.distributed as dist

REDRAW_S = 0.2  # a terminal needs no more; a fast GPU step must not pay for a redraw every step


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EpochProgress:
    """One epoch's steps, from ``first_step`` (non-zero when resumed mid-epoch) to ``steps``."""

    def __init__(self, log: logging.Logger, epoch: int, steps: int, first_step: int = 0, print_freq: int = 10,
                 stream: TextIO | None = None):
        self.log, self.epoch, self.steps, self.first_step, self.print_freq = log, epoch, steps, first_step, print_freq
        # The console log's stream: moco.runtime.logger clears the redrawn line before a log line only on that terminal.
        self.stream = stream or sys.stdout
        self.live = _rank() == 0 and self.stream.isatty()
        self.details = ""
        self.images = 0
        self.start = time.perf_counter()
        self.drawn = -REDRAW_S

    def update(self, step: int, images: int, details: Callable[[], str]) -> None:
        """After ``step``, which took ``images`` over all ranks. ``details()`` (the loss: it may wait for the
        device) is read only at --print-freq steps."""
        self.images += images
        if self.print_freq and step % self.print_freq == 0:
            self.details = details()
            self.log.info("epoch %d step %d/%d %s", self.epoch, step, self.steps, self.details,
                          extra={"console": not self.live})
        now = time.perf_counter()
        if self.live and (now - self.drawn >= REDRAW_S or step + 1 == self.steps):
            self.drawn = now
            self.stream.write("\r\x1b[K" + self.line(step, now)[:shutil.get_terminal_size().columns - 1])
            self.stream.flush()

    def line(self, step: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        left = elapsed / (step + 1 - self.first_step) * (self.steps - step - 1)
        return (f"epoch {self.epoch} step {step + 1}/{self.steps} {self.images / elapsed:.1f} img/s "
                f"ETA {datetime.timedelta(seconds=round(left))} {self.details}").rstrip()
