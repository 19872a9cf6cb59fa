"""What a fine-tuning stage was trained from, and whether the run directory still holds that.

Every stage checkpoint records ``upstream``, the identity (``moco.runtime.runs.identity``: path, run id, epoch) of the
file the stage started from: r1's ``--bp`` backbone (None for a random initialisation), r2's and r3's the previous
stage's final checkpoint ("unknown" in a stage resumed from a checkpoint older than these records). One
``--output-dir`` holds one chain, so a stage's upstream is judged against its sibling
``<output-dir>/<previous stage>/checkpoint_last.pth.tar``, and r1's against ``--bp``:

- r1 refuses a backbone from an unfinished pretraining run: a ``checkpoint_last`` whose epoch is short of its
  run's ``--epochs``, or any checkpoint written mid-epoch. Another file written at an epoch's end (a numbered
  ``checkpoint_0050.pth.tar``) is an epoch chosen on purpose: used, with a warning. Backbones that record no
  ``--epochs`` (facebookresearch/moco's releases, torchvision's weights) are used as they are.
- A stage resuming its own checkpoint refuses when its upstream has changed since (the previous stage was run
  again or continued, or r1 is given another ``--bp``): continuing would train one model on two runs.
- demo.evaluate refuses a checkpoint whose chain, stage by stage, no longer matches the run directory's.
"""
from __future__ import annotations

import time
from pathlib import Path

from moco.runtime import checkpoint, runs
from moco.runtime.logger import get_logger

from .recipe import STAGES

log = get_logger(__name__)

UNKNOWN = "unknown"  # the upstream of a stage resumed from a checkpoint that predates these records


def check_backbone(path: str | Path) -> dict:
    """The identity r1 records of its ``--bp``; a ValueError for a checkpoint of unfinished pretraining."""
    path = Path(path)
    ckpt = checkpoint.load(path, mmap=True)  # only the small entries are read here
    epoch, step = ckpt.get("epoch"), ckpt.get("step") or 0
    if step:
        raise ValueError(f"{path}: written in the middle of an epoch (epoch {epoch}, step {step}) by a run that was "
                         f"stopped; a backbone comes from the end of an epoch: let that run finish (re-running it "
                         f"resumes it)")
    epochs = None if "model_config" in ckpt else (ckpt.get("args") or {}).get("epochs")  # a pretraining's length
    if epochs is not None and epoch < epochs:
        if path.name == checkpoint.LAST:
            raise ValueError(f"{path}: pretraining stopped at epoch {epoch} of {epochs} (still running, or stopped): "
                             f"let it finish (re-running it resumes it), or choose an epoch on purpose with its "
                             f"numbered checkpoint_NNNN.pth.tar")
        log.warning("backbone %s: epoch %d of a %d-epoch pretraining, chosen by its name", path, epoch, epochs)
    return runs.identity(ckpt, path)


def describe_upstream(record: dict | str | None, stage: str | None) -> str:
    """An upstream record in words; ``stage``: the previous stage, None for r1's backbone."""
    if record == UNKNOWN:
        return "an upstream that was not recorded (an older checkpoint)"
    if record is None:
        return "no backbone (a random initialisation)"
    return f"{stage or 'backbone'} {runs.describe_checkpoint(record)}"


def changed_upstream(ckpt: dict, path: Path, stage_dir: Path, bp: str = "") -> str | None:
    """Why the stage checkpoint ``ckpt``, read from ``path`` and judged as part of the run in ``stage_dir``, no
    longer matches what it was trained from; None when it matches, or when that cannot be told."""
    recorded = ckpt.get("upstream", UNKNOWN)
    if recorded == UNKNOWN:
        log.warning("%s records no upstream (an older checkpoint): not checked against what it was trained from",
                    path)
        return None
    previous = STAGES[ckpt["stage"]].previous
    if previous:
        current_path = stage_dir.parent / previous / checkpoint.LAST
        if not current_path.is_file():
            log.warning("%s: gone, so %s cannot be checked against it", current_path, path)
            return None
    elif bp:
        current_path = Path(bp)
    else:
        return None  # r1 without --bp: nothing to compare with
    current = runs.identity(checkpoint.load(current_path, mmap=True), current_path)
    if recorded is not None and runs.same_checkpoint(recorded, current):
        return None
    return (f"{path}: stage {ckpt['stage']} was trained from {describe_upstream(recorded, previous)}, but "
            f"{current_path} now holds {describe_upstream(current, previous)}")


def check_chain(path: str | Path) -> None:
    """Refuse a stage checkpoint kept in its stage's directory when a stage below it in that run directory has
    changed since it was trained on it. A checkpoint kept elsewhere cannot be judged and is let through."""
    top = path = Path(path)
    ckpt = checkpoint.load(path, mmap=True)
    while ckpt.get("stage") in STAGES and path.parent.name == ckpt["stage"]:
        previous = STAGES[ckpt["stage"]].previous
        reason = changed_upstream(ckpt, path, path.parent)
        if reason:
            raise ValueError(f"{top}: its chain has changed since it was trained: {reason}. Run stage "
                             f"{ckpt['stage']} again from the current {previous} (demo.train --restart moves the "
                             f"old {ckpt['stage']} aside), then the stages after it")
        if not previous or not (path.parent.parent / previous / checkpoint.LAST).is_file():
            return
        path = path.parent.parent / previous / checkpoint.LAST
        ckpt = checkpoint.load(path, mmap=True)


def move_aside(stage_dir: Path) -> Path:
    """Rename ``stage_dir`` to ``<stage>.replaced-<time>`` (never over an existing one): kept, out of the chain."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = stage_dir.with_name(f"{stage_dir.name}.replaced-{stamp}"), 1
    while aside.exists():
        aside, n = stage_dir.with_name(f"{stage_dir.name}.replaced-{stamp}-{n}"), n + 1
    stage_dir.rename(aside)
    return aside
