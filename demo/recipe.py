"""The fine-tuning recipe: the transfer protocols, and the stages r1/r2/r3 at total batch 4.

A protocol says how the backbone is fine-tuned:
- ``moco`` (the default): MoCo's detection transfer (He et al. 2020, section 4.2; facebookresearch/moco's
  detection configs): BatchNorm trained in the backbone and synchronised over ranks, every ResNet stage trained,
  the short image side drawn per image from ``multiscale_sizes`` (0.6x to 1x the test size, in steps of 32: 480..800
  for 800), r1 at lr 0.01 at batch 4. Self-supervised features have statistics unlike supervised ones; frozen
  BatchNorm keeps them, where trained BatchNorm adapts them. A randomly initialised baseline gets the same protocol.
- ``original``: the original project's: FrozenBatchNorm2d with the checkpoint's statistics, the top 3 stages
  trained, one image size, r1 at lr 0.03 at batch 4.

Stage r1 trains epochs 0..22 at the protocol's lr, r2 continues r1's final weights and optimizer to epoch 27 at a
tenth of it, r3 continues r2's to epoch 37 at a hundredth. The lr scales linearly with the total batch (Goyal et
al. 2017); r1 warms up linearly over its first iterations, since it starts from a backbone with an untrained head.
"""
from __future__ import annotations

from dataclasses import dataclass

REFERENCE_BATCH = 4
WARMUP_FACTOR = 1e-3  # the lr starts at this fraction of the stage lr
MULTISCALE_LOW = 0.6  # the smallest training size, as a fraction of the test size (480 / 800 in MoCo's configs)
MULTISCALE_STEP = 32


@dataclass(frozen=True)
class Protocol:
    name: str
    norm: str  # demo.model.NORMS
    trainable_layers: int
    multiscale: bool
    lr: float  # r1's, at REFERENCE_BATCH


@dataclass(frozen=True)
class Stage:
    name: str
    lr_factor: float  # of the protocol's r1 lr
    end_epoch: int  # epochs completed when the stage ends, counted from the start of r1
    previous: str | None  # the stage whose final checkpoint this one starts from
    warmup_iters: int = 0  # capped at one epoch of iterations


PROTOCOLS = {p.name: p for p in (
    Protocol("moco", norm="sync", trainable_layers=5, multiscale=True, lr=0.01),
    Protocol("original", norm="frozen", trainable_layers=3, multiscale=False, lr=0.03),
)}
DEFAULT_PROTOCOL = "moco"
# Checkpoints from before protocols were recorded were all trained under the original's.
UNRECORDED_PROTOCOL = "original"

STAGES = {s.name: s for s in (
    Stage("r1", lr_factor=1.0, end_epoch=23, previous=None, warmup_iters=1000),
    Stage("r2", lr_factor=0.1, end_epoch=27, previous="r1"),
    Stage("r3", lr_factor=0.01, end_epoch=37, previous="r2"),
)}


def scaled_lr(protocol: Protocol, stage: Stage, batch_size: int) -> float:
    return protocol.lr * stage.lr_factor * batch_size / REFERENCE_BATCH


def multiscale_sizes(test_size: int) -> tuple[int, ...]:
    """Short sides to train at, ascending, ending at the test size: (480, 512, ..., 800) for 800."""
    low = MULTISCALE_LOW * test_size
    return tuple(reversed(range(test_size, int(low) - 1, -MULTISCALE_STEP)))


def warmup_factor(iteration: int, warmup_iters: int) -> float:
    if iteration >= warmup_iters:
        return 1.0
    return WARMUP_FACTOR + (1.0 - WARMUP_FACTOR) * iteration / warmup_iters
