"""A run's per-epoch records, written in one place: ``metrics.jsonl`` and TensorBoard event files beside it.

``metrics.jsonl`` (one JSON object per line) is what tests, ``demo.plots`` and ``demo.compare`` read after a run;
the event files let ``tensorboard --logdir runs`` watch it live. Every number of a record becomes a scalar with the
record's epoch as its step, so fine-tuning stages, whose epochs count on from r1, continue each other's curves.
Rank 0 alone writes: records are already reduced over ranks. TensorBoard is optional: without it a run warns once
and keeps writing metrics.jsonl.
"""
from __future__ import annotations

import json
from pathlib import Path

from .logger import get_logger

log = get_logger(__name__)

FILE = "metrics.jsonl"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: dict) -> dict[str, float]:
    """A record's TensorBoard tags: a nested dict under its own name (``val/AP``), the kNN probe under ``probe/``,
    every other number under ``train/``. The epoch is the step, not a scalar; text (the stage) is left out."""
    tags = {}
    for key, value in record.items():
        if isinstance(value, dict):
            tags.update((f"{key}/{name}", float(v)) for name, v in value.items() if _is_number(v))
        elif key != "epoch" and _is_number(value):
            tags[f"{'probe' if key.startswith('knn_') else 'train'}/{key}"] = float(value)
    return tags


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that does not parse (a run writing it right now) is passed over."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not a JSON record (still being written?), passed over", path, number)
    return records


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` and, as scalars, to TensorBoard event files in ``run_dir``.

    The event file is opened at the first record, so a run that stops before finishing an epoch leaves none."""

    def __init__(self, run_dir: str | Path, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FILE
        self.enabled = rank == 0
        self._board = None
        self._no_board = False  # tensorboard is missing: warned once, metrics.jsonl only

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        board = self._open_board()
        if board is not None:
            for tag, value in scalars(record).items():
                board.add_scalar(tag, value, global_step=record["epoch"])
            board.flush()  # an epoch takes minutes: show it now, not at the writer's next timed flush

    def _open_board(self):
        if self._board is None and not self._no_board:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                self._no_board = True
                log.warning("no TensorBoard event files (%s): metrics go to %s only; pip install tensorboard", exc,
                            self.path)
            else:
                self._board = SummaryWriter(str(self.run_dir))
        return self._board

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
