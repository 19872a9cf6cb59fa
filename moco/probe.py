"""kNN probe: does the backbone separate the labeled objects, before any detector is trained?

Ground-truth boxes of the labeled split are cropped and resized to squares. Backbone features of the
training crops form the memory bank; each validation crop takes the similarity-weighted vote of its
k nearest training crops (cosine similarity, weights exp(s / T), as in Wu et al. 2018). Reports top-1.

Twice: ``knn_top1`` with every BatchNorm's statistics re-estimated on the probe's training crops (precise BN:
the average over batches of their statistics), and ``knn_top1_own_bn`` with the statistics the backbone holds.
The first compares backbones under the same normalisation: a random network's running statistics are the
identity, which no network that has seen data keeps, and a pretrained one's come from pretraining crops, not
object crops; fine-tuning with trained BatchNorm re-estimates them too.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .augment import Normalize
from .batchnorm import SplitBatchNorm2d
from .course.images import load_rgb
from .course.labels import fit_boxes
from .course.layout import list_split, read_label_file


def load_crops(root: str | Path, split: str, size: int,
               max_images: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 crops Nx3xSxS of every box of a split (the first ``max_images`` images when given) and their names."""
    pairs = list_split(root, split)
    if max_images is not None and len(pairs) > max_images:
        # An even spread over the split rather than its first images.
        step = len(pairs) / max_images
        pairs = [pairs[int(i * step)] for i in range(max_images)]
    crops, names = [], []
    for image_path, label_path in pairs:
        boxes, labels = read_label_file(label_path)
        image = load_rgb(image_path)
        kept, boxes, _ = fit_boxes(label_path, boxes, *image.size)  # the detector's repairs (moco.course.labels)
        for box, name in zip(boxes, (labels[i] for i in kept)):
            crop = image.crop(tuple(round(v) for v in box)).resize((size, size), Image.BILINEAR)
            crops.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
            names.append(name)
    if not crops:
        raise ValueError(f"{root}/{split}: no boxes to probe with")
    return torch.stack(crops), names


def extract_features(backbone: nn.Module, crops: torch.Tensor, device: torch.device, batch_size: int = 256,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    normalize = Normalize(memory_format=torch.channels_last).to(device)
    feats = []
    # no_grad as a context, not a decorator: `make mutate` (mutmut) skips decorated functions.
    with torch.no_grad():
        for batch in crops.split(batch_size):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                feats.append(backbone(normalize(batch)).float())
    return F.normalize(torch.cat(feats), dim=1)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, T: float = 0.07) -> float:
    """Top-1 accuracy of the similarity-weighted kNN vote; features must be L2-normalised."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    sims, idx = (test_feats @ train_feats.T).topk(k, dim=1)  # sims, idx: NxK
    votes = torch.zeros(test_feats.shape[0], num_classes, device=test_feats.device)
    votes.scatter_add_(1, train_labels[idx], (sims / T).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def backbone_of(encoder: nn.Module) -> nn.Module:
    """A copy of a ResNet encoder with its projection head removed: it returns pooled features."""
    backbone = copy.deepcopy(encoder)
    backbone.fc = nn.Identity()
    return backbone.eval()


def recalibrated(backbone: nn.Module, crops: torch.Tensor, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm statistics are the average of those of ``crops``' batches."""
    backbone = copy.deepcopy(backbone)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
            if isinstance(module, SplitBatchNorm2d):
                module.num_splits = 1
    extract_features(backbone.train(), crops, device, amp_dtype=amp_dtype)
    return backbone.eval()


class KnnProbe:
    """Loads the crops once; each call scores a ResNet encoder (its head is ignored)."""

    def __init__(self, root: str | Path, image_size: int, device: torch.device, k: int = 20,
                 max_images: int | None = 2000, amp_dtype: torch.dtype | None = None):
        self.device, self.k, self.amp_dtype = device, k, amp_dtype
        self.train_crops, train_names = load_crops(root, "training", image_size, max_images)
        self.val_crops, val_names = load_crops(root, "validation", image_size, max_images)
        classes = sorted(set(train_names) | set(val_names))
        index = {name: i for i, name in enumerate(classes)}
        self.train_labels = torch.tensor([index[n] for n in train_names], device=device)
        self.val_labels = torch.tensor([index[n] for n in val_names], device=device)
        self.num_classes = len(classes)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """Top-1 of the encoder's backbone, as ``knn_top1`` (recalibrated BatchNorm) and ``knn_top1_own_bn``."""
        own = backbone_of(encoder)
        return {"knn_top1": self.score(recalibrated(own, self.train_crops, self.device, self.amp_dtype)),
                "knn_top1_own_bn": self.score(own)}

    def score(self, backbone: nn.Module) -> float:
        train = extract_features(backbone, self.train_crops, self.device, amp_dtype=self.amp_dtype)
        val = extract_features(backbone, self.val_crops, self.device, amp_dtype=self.amp_dtype)
        return knn_top1(train, self.train_labels, val, self.val_labels, k=self.k)
