"""Unlabeled images for pretraining, and a sampler that makes every random choice a function of the seed.

The course ships ``unlabeled_224.sqsh``; ``unsquashfs -d train unlabeled_224.sqsh`` leaves the images in
``train/unlabeled/N.PNG``. Any of ``train/``, ``train/unlabeled/`` or a flat folder of images is accepted.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from .course.images import is_image, load_rgb, number_key
from .runtime.unreadable import DEFAULT_MAX_UNREADABLE, first_readable


def find_unlabeled_images(data_dir: str | Path) -> list[Path]:
    """The images of ``data_dir``, ``data_dir/unlabeled`` or ``data_dir/train/unlabeled``, numerically ordered."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such directory (expected the unsquashed unlabeled images)")
    candidates = [data_dir, data_dir / "unlabeled", data_dir / "train" / "unlabeled"]
    for folder in candidates:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if is_image(e.name)]
        if names:
            return [folder / n for n in sorted(names, key=number_key)]
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{data_dir}: no .PNG/.JPEG images found (looked in {looked})")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, sample): augmentations do not depend on worker layout."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) & ((1 << 63) - 1)


class UnlabeledImages(Dataset):
    """Indexed by ``(epoch, index)`` (see ``EpochSampler``); returns ``(transform(image), failed, error)``.

    An unreadable file's sample is the next readable image, augmented with the seed of the sample it replaces, so
    that it too is a function of (seed, epoch, index) and of which files are bad; ``failed`` is the index whose
    file failed (-1: none), ``error`` says why (see moco.runtime.unreadable)."""

    def __init__(self, paths: list[Path], transform, seed: int = 0, max_unreadable: int = DEFAULT_MAX_UNREADABLE):
        self.paths, self.transform, self.seed, self.max_unreadable = paths, transform, seed, max_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, failed, error = first_readable(lambda i: load_rgb(self.paths[i]), index, len(self.paths),
                                              self.max_unreadable)
        # torchvision's transforms draw from torch's global RNG; fork it so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), failed, error


class EpochSampler(Sampler):
    """This rank's share of a seeded per-epoch permutation, as ``(epoch, index)`` keys.

    Every rank gets the same number of samples (the tail that does not divide is dropped), so DDP ranks run
    the same number of steps. The epoch travels with each key, so persistent workers need no notification.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.world_size - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order[: self.size // self.world_size * self.world_size][self.rank :: self.world_size][self.skip :]
        return iter([(self.epoch, int(i)) for i in order])
