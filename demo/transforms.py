"""Image + box transforms with ``torchvision.transforms.v2``: boxes move with the image, degenerate ones go.

Images stay uint8 until they reach the device (a quarter of the bytes through the loader); the detector's own
transform resizes and normalises them there.
"""
from __future__ import annotations

from torchvision.transforms import v2


def train_transforms(hflip: float = 0.5) -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(hflip),  # the original recipe's only augmentation
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),  # drops boxes (and their labels) left without area
    ])

