"""Batches of images with similar aspect ratio, so the detector pads little; sharded over ranks.

Training: each epoch a seeded permutation is cut into one shard per rank (padded so every rank gets as many
batches, which DDP needs), then batched within the two aspect groups (landscape, portrait).
Evaluation: the batches are fixed by the data alone and dealt round-robin to ranks, so every image sees exactly
the batch it would see in a single process: distributed results equal single-process ones.
"""
from __future__ import annotations

import math

import torch

from moco.runtime.failures import UsageError


def aspect_group(ratio: float) -> int:
    return 0 if ratio >= 1.0 else 1


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(self, aspect_ratios: list[float], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if len(aspect_ratios) < batch_size * world_size:
            raise UsageError(f"{len(aspect_ratios)} images cannot fill one batch of {batch_size} on "
                             f"{world_size} process(es)")
        self.groups = [aspect_group(r) for r in aspect_ratios]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.per_rank = math.ceil(len(aspect_ratios) / world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: batches already trained this epoch (a mid-epoch resume sees the rest of the same order)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size) - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        order += order[: self.per_rank * self.world_size - len(order)]  # pad by repeating the first
        shard = order[self.rank::self.world_size]
        buckets: dict[int, list[int]] = {0: [], 1: []}
        batches = []
        for index in shard:
            bucket = buckets[self.groups[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        # Leftovers of both groups, mixed: the batch count stays ceil(shard / batch) on every rank.
        rest = buckets[0] + buckets[1]
        batches += [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
        return iter(batches[self.skip:])


def eval_batches(aspect_ratios: list[float], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's share of evaluation batches; the batches themselves do not depend on the world size."""
    order = sorted(range(len(aspect_ratios)), key=lambda i: (aspect_group(aspect_ratios[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]
