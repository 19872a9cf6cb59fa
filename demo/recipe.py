"""The fine-tuning recipe, one stage per row: the original project's r1/r2/r3 at total batch 4.

Stage r1 trains epochs 0..22 at lr 0.03, r2 continues r1's final weights and optimizer to epoch 27 at 0.003,
r3 continues r2's to epoch 37 at 0.0003. The lr scales linearly with the total batch (Goyal et al. 2017);
r1 warms up linearly over its first iterations, since it starts from a backbone with an untrained head.
"""
from __future__ import annotations

from dataclasses import dataclass

REFERENCE_BATCH = 4
WARMUP_FACTOR = 1e-3  # the lr starts at this fraction of the stage lr


@dataclass(frozen=True)
class Stage:
    name: str
    lr: float  # at REFERENCE_BATCH
    end_epoch: int  # epochs completed when the stage ends, counted from the start of r1
    previous: str | None  # the stage whose final checkpoint this one starts from
    warmup_iters: int = 0  # capped at one epoch of iterations


STAGES = {s.name: s for s in (
    Stage("r1", lr=0.03, end_epoch=23, previous=None, warmup_iters=1000),
    Stage("r2", lr=0.003, end_epoch=27, previous="r1"),
    Stage("r3", lr=0.0003, end_epoch=37, previous="r2"),
)}


def scaled_lr(stage: Stage, batch_size: int) -> float:
    return stage.lr * batch_size / REFERENCE_BATCH


def warmup_factor(iteration: int, warmup_iters: int) -> float:
    if iteration >= warmup_iters:
        return 1.0
    return WARMUP_FACTOR + (1.0 - WARMUP_FACTOR) * iteration / warmup_iters
