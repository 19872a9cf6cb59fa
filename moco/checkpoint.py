"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is first written beside its target under a temporary name, flushed to disk, then renamed over
the target, so a job killed mid-write leaves the previous checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

LAST = "checkpoint_last.pth.tar"


def numbered_name(epochs_done: int) -> str:
    """``checkpoint_0100.pth.tar`` after 100 completed epochs."""
    return f"checkpoint_{epochs_done:04d}.pth.tar"


def save_atomic(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


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
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path}: expected a dict checkpoint, found {type(ckpt).__name__}")
    return ckpt


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
