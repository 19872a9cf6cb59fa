"""Which checkpoint a run continues, decided once for all ranks, and the identity every checkpoint carries.

- A run's own ``checkpoint_last`` wins over ``--resume``: a requeued job runs the same command line again, so a
  ``--resume`` in it applies to the first start only, and every later start continues the run's own progress.
- A ``checkpoint_last`` that does not read (truncated, garbage) is passed over, with a warning, for the newest
  readable earlier checkpoint of the same run that the trainer names (moco.train's numbered ones, demo.train's
  ``checkpoint_best``); with none readable the run stops, naming the files tried: starting afresh would lose it.
- Rank 0 alone looks at the files and decides; the other ranks receive its decision, or its refusal. They cannot
  start from different files because one looked while rank 0 was writing, or through a stale filesystem cache.
  Rank 0's checkpoint saves go the same way, so that every rank learns of one that failed.
- ``run_id``: drawn when a run starts afresh, kept by every resume. A run that starts from another one's checkpoint
  records that checkpoint's identity (run id and epoch), so it can tell later whether the file was replaced by
  another run since. Checkpoints without an id (older ones, facebookresearch/moco's) are known by a hash of their
  bytes instead.
"""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from . import checkpoint
from .logger import get_logger

log = get_logger(__name__)

T = TypeVar("T")
# Errors every rank repeats as they are: the entry points turn each into one message and its exit status.
_REPEATED_ERRORS = {cls.__name__: cls for cls in (FileNotFoundError, ValueError, checkpoint.WriteError)}


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_id_of(ckpt: dict, path: str | Path) -> str:
    """The run that wrote ``ckpt`` (read from ``path``): its recorded id, else a fingerprint of the file."""
    if ckpt.get("run_id"):
        return str(ckpt["run_id"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def identity(ckpt: dict, path: str | Path) -> dict:
    """What a run records of the checkpoint it started from; ``same_checkpoint`` compares two of them."""
    return {"path": str(Path(path).resolve()), "run_id": run_id_of(ckpt, path), "epoch": ckpt.get("epoch")}


def same_checkpoint(a: dict, b: dict) -> bool:
    """The same run at the same epoch: a re-run (new id) or a run continued past the recorded epoch is not."""
    return (a["run_id"], a["epoch"]) == (b["run_id"], b["epoch"])


def describe_checkpoint(record: dict) -> str:
    return f"run {record['run_id']} at epoch {record['epoch']}"


def first_loadable_checkpoint(paths: Iterable[Path]) -> tuple[Path, list[str]]:
    """The first of ``paths`` that reads as a checkpoint, and why each one before it did not; a ValueError naming
    every file tried when none does."""
    paths, unreadable = list(paths), []
    for path in paths:
        try:
            checkpoint.load(path, mmap=True)  # the small entries only: cheap even for a large file
        except (FileNotFoundError, checkpoint.UnreadableCheckpoint) as exc:
            unreadable.append(str(exc))
            continue
        return path, unreadable
    raise ValueError(f"no readable checkpoint to continue from: {'; '.join(unreadable)}. Starting afresh would "
                     f"lose the run: restore one of them, or move {paths[0].parent} aside to start over")


def resume_file(own_last: Path, resume: str, fallbacks: Iterable[Path] = ()) -> Path | None:
    """The checkpoint a run continues: its own ``checkpoint_last`` when there is one, whatever ``--resume`` says,
    or, when that does not read, the first readable of ``fallbacks`` (earlier checkpoints of the run, newest
    first); else ``--resume``'s file, else None (a fresh start)."""
    if own_last.is_file():
        if resume and Path(resume).resolve() != own_last.resolve():
            log.warning("--resume %s ignored: %s already has its own checkpoint %s, which this run continues",
                        resume, own_last.parent, own_last.name)
        chosen, unreadable = first_loadable_checkpoint([own_last, *fallbacks])
        if unreadable:
            log.warning("%s; continuing from %s instead", "; ".join(unreadable), chosen)
        return chosen
    return Path(resume) if resume else None


def decided_by_rank0(decide: Callable[[], T], device: torch.device | None = None) -> T:
    """``decide()`` runs on rank 0 only; every rank returns its value, or raises its error (FileNotFoundError,
    ValueError and checkpoint.WriteError as they are, anything else as a RuntimeError naming it), so no rank waits
    for one that gave up.
    The value must pickle. Without a process group this is just ``decide()``."""
    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    outcome: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = (decide(), None, None)
        except Exception as exc:  # sent on first: the other ranks are waiting in the broadcast below
            error, outcome[0] = exc, (None, type(exc).__name__, str(exc))
    dist.broadcast_object_list(outcome, src=0, device=device)
    if error is not None:
        raise error
    value, kind, message = outcome[0]
    if kind in _REPEATED_ERRORS:
        raise _REPEATED_ERRORS[kind](message)
    if kind is not None:
        raise RuntimeError(f"rank 0 failed to decide: {kind}: {message}")
    return value
