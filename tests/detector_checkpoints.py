"""Untrained demo.train-style detector checkpoints whose classifier is tilted to give boxes, for inference tests."""
from collections.abc import Callable
from pathlib import Path

import torch

from demo.model import DetectorConfig, build_detector
from moco.runtime import checkpoint


def save_detector(path: Path, categories: dict[int, str], min_size: int, tilt: Callable) -> Path:
    """A ResNet-18 detector of ``categories`` at ``min_size``; ``tilt(cls_score)`` biases its classifier in place."""
    torch.manual_seed(0)
    config = DetectorConfig(arch="resnet18", num_classes=len(categories) + 1, min_size=min_size,
                            max_size=min_size * 3 // 2, rois_per_image=16, fpn_channels=32)
    model = build_detector(config)
    with torch.no_grad():
        tilt(model.roi_heads.box_predictor.cls_score)
    checkpoint.save_atomic({"model": model.state_dict(), "model_config": config.to_dict(), "stage": "r3",
                            "epoch": 1, "categories": [[k, v] for k, v in categories.items()]}, path)
    return path
