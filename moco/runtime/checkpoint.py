"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is first written beside its target under a temporary name, flushed to disk, then renamed over
the target, so a job killed mid-write leaves the previous checkpoint intact, never a truncated one. A write that
fails (a full disk, a quota) removes the temporary file and raises ``WriteError``, which says how much room is left.
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

LAST = "checkpoint_last.pth.tar"
_NUMBERED = re.compile(r"checkpoint_(\d+)\.pth\.tar")


class UnreadableCheckpoint(ValueError):
    """The file is not a checkpoint this project can read (truncated, foreign, not a dict). A ValueError: the entry
    points report it in one line, as any problem for the user to fix."""


class WriteError(OSError):
    """A checkpoint could not be written; the file at its path, if there is one, is the previous one, untouched."""


def numbered_name(epochs_done: int) -> str:
    """``checkpoint_0100.pth.tar`` after 100 completed epochs."""
    return f"checkpoint_{epochs_done:04d}.pth.tar"


def numbered(directory: str | Path) -> list[Path]:
    """The numbered checkpoints in ``directory``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class _Writer:
    """A file's ``write`` that keeps the OSError it raised: torch.save reports one only as a RuntimeError
    ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**30:.1f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def save_atomic(obj: dict, path: str | Path, dump: Callable | None = None) -> Path:
    """``dump(obj, file)`` writes the bytes: torch.save (the default, looked up at each call), or pickle.dump for
    files that tools without torch read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                writer = _Writer(f)
                try:
                    (dump or torch.save)(obj, writer)
                except RuntimeError:
                    if writer.error is None:
                        raise
                    raise writer.error from None
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        kept = "; the previous checkpoint is intact" if path.is_file() else ""
        raise WriteError(f"cannot write {path}: {exc} ({_free_space(path.parent)} on that filesystem){kept}") from exc
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def _one_line(exc: Exception) -> str:
    """torch's reason in one line: a weights-only refusal spans a paragraph whose line after "WeightsUnpickler
    error:" says what the file holds; other errors say it in their first line."""
    _, refused, reason = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if refused else str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else ""


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only, no code from the file runs. ``mmap``
    leaves the tensors on disk until used: reading a large checkpoint's small entries then costs next to nothing
    (files in torch's pre-1.6 format, such as facebookresearch/moco's releases, are read whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises several unrelated types for truncated or foreign files
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({type(exc).__name__}: {_one_line(exc)})"
                                   ) from exc
    if not isinstance(ckpt, dict):
        raise UnreadableCheckpoint(f"{path}: expected a dict checkpoint, found {type(ckpt).__name__}")
    return ckpt


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
