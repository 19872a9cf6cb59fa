"""MoCo's two-crop augmentation on PIL images (the fastest path measured on CPU workers).

Views leave the workers as uint8 tensors; normalisation happens on the training device
(``Normalize``), which quarters the bytes crossing to the GPU and spares the workers a float pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL's Gaussian blur with sigma drawn uniformly from ``sigma`` (SimCLR's blur, as MoCo v2 uses it)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        # torch's RNG, not `random`, so one seed fixes every random choice of a sample.
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def moco_augmentation(image_size: int = 224, aug_plus: bool = True) -> transforms.Compose:
    """aug_plus: MoCo v2's recipe (SimCLR-like, with blur); otherwise MoCo v1's (InstDisc-like)."""
    if aug_plus:
        # Blur sigma is specified for 224-pixel crops; scale it with the crop so small test images are not erased.
        scale = image_size / 224
        ops = [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur((0.1 * scale, 2.0 * scale))], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        ops = [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
        ]
    return transforms.Compose([*ops, transforms.PILToTensor()])


class TwoCropsTransform:
    """Two independent augmentations of one image: the query view and the key view."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.base_transform(image), self.base_transform(image)]


class Normalize(nn.Module):
    """uint8 NCHW batch -> float, ImageNet-normalised, in the given memory format, on the batch's device."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, memory_format=torch.contiguous_format):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1),
                             persistent=False)
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.device, non_blocking=True).float()
        return (x * self.scale - self.shift).contiguous(memory_format=self.memory_format)
