"""Logging for every module: one configuration, rank-aware, to stdout and a file in the run directory."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _shown_on_console(record: logging.LogRecord) -> bool:
    """Records logged with ``extra={"console": False}`` go to the file alone: on a terminal, moco.runtime.progress's
    redrawn line stands in for its periodic lines."""
    return getattr(record, "console", True)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(rank: int = 0, log_file: str | Path | None = None) -> None:
    """Rank 0 logs INFO; other ranks only warnings, so a multi-GPU log reads like a single-process one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(_shown_on_console)
    # On a terminal a line first clears moco.runtime.progress's redrawn line, rather than continuing it.
    handlers = {console: ("\r\x1b[K" if sys.stdout.isatty() else "") + _FORMAT}
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers[logging.FileHandler(log_file)] = _FORMAT
    for handler, line_format in handlers.items():
        handler.setFormatter(logging.Formatter(line_format, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter(rank))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
