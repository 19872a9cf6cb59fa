"""Faster R-CNN + FPN (torchvision) on a ResNet body that comes from a MoCo checkpoint, a torchvision
state dict, or random initialisation.

RoIAlign pools from all four FPN levels (torchvision's ``MultiScaleRoIAlign`` over '0'..'3'). BatchNorm is
either ``FrozenBatchNorm2d`` (``norm="frozen"``, the original project's): a fixed affine map that ``model.train()``
cannot switch back to batch statistics; or trained (``norm="sync"``), synchronised over ranks as in MoCo's detection
transfer (the training script converts it to SyncBatchNorm on GPUs). With ``train_min_sizes`` each training image's
short side is drawn from them (torchvision's ``GeneralizedRCNNTransform``); evaluation always uses ``min_size``.
The dataclass defaults are the original's, which is what checkpoints that predate a field were trained with.
Anchors and box arithmetic stay in fp32 under autocast (see ``demo.fp32_boxes``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn
import torchvision.models as tv_models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from moco.backbone import backbone_weights, infer_arch, read_backbone  # noqa: F401 (re-exported)
from moco.runtime.logger import get_logger

from .fp32_boxes import Float32AnchorGenerator, Float32FastRCNNPredictor, Float32RPNHead

log = get_logger(__name__)

NORMS = ("frozen", "sync")
BOX_HEAD_WIDTH = 1024  # torchvision's TwoMLPHead representation size


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild the network; stored in every fine-tuned checkpoint."""
    arch: str = "resnet50"
    num_classes: int = 101  # the course's 100 classes + background
    trainable_layers: int = 3  # ResNet stages trained, counted from the top (0..5)
    norm: str = "frozen"
    min_size: int = 800  # images are resized so their short side is min_size, long side at most max_size
    max_size: int = 1333
    rois_per_image: int = 512  # RoIs sampled per image for the box head's loss
    fpn_channels: int = 256  # FPN and RPN convs dominate the cost at small sizes: 128 is 2x faster on a CPU
    train_min_sizes: tuple[int, ...] = ()  # short sides drawn from in training; empty: min_size alone

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r}: one of {NORMS}")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers {self.trainable_layers}: 0..5")
        if self.norm == "sync" and self.trainable_layers < 5:
            # Frozen stages would still update BatchNorm statistics in train mode: the original's defect 3.
            raise ValueError("norm 'sync' trains BatchNorm statistics in every stage: use trainable_layers 5")
        object.__setattr__(self, "train_min_sizes", tuple(int(s) for s in self.train_min_sizes))
        if any(s < 1 for s in self.train_min_sizes):
            raise ValueError(f"train_min_sizes {self.train_min_sizes}: sizes in pixels")

    def sizes(self) -> tuple[int, ...]:
        """torchvision's min_size: training draws from all, evaluation takes the last, which is min_size."""
        return tuple(s for s in self.train_min_sizes if s != self.min_size) + (self.min_size,)

    def to_dict(self) -> dict:
        return asdict(self)


def build_detector(config: DetectorConfig) -> FasterRCNN:
    norm_layer = FrozenBatchNorm2d if config.norm == "frozen" else nn.BatchNorm2d
    body = tv_models.get_model(config.arch, weights=None, norm_layer=norm_layer)
    backbone = _resnet_fpn_extractor(body, config.trainable_layers)
    if config.fpn_channels != backbone.out_channels:  # torchvision's extractor fixes 256
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, config.fpn_channels, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = config.fpn_channels
    anchors = Float32AnchorGenerator()
    return FasterRCNN(backbone, min_size=config.sizes(), max_size=config.max_size,
                      box_batch_size_per_image=config.rois_per_image, rpn_anchor_generator=anchors,
                      rpn_head=Float32RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
                      box_predictor=Float32FastRCNNPredictor(BOX_HEAD_WIDTH, config.num_classes))


def trained_categories(ckpt: dict) -> dict[int, str]:
    """The classes (id: name) a demo.train checkpoint was trained on; none for any other checkpoint."""
    return {int(k): v for k, v in ckpt.get("categories", ())}


def detector_from_checkpoint(ckpt: dict, source: str | Path, categories: dict[int, str]
                             ) -> tuple[FasterRCNN, DetectorConfig]:
    """Rebuild a fine-tuned detector from its checkpoint alone, for data with these ``categories`` (id: name)."""
    if "model_config" not in ckpt:
        raise ValueError(f"{source}: not a detector checkpoint of demo.train (a backbone goes to --bp)")
    trained = trained_categories(ckpt)
    if trained != categories:
        differences = sorted(set(trained.items()) ^ set(categories.items()))[:3]
        raise ValueError(f"{source}: trained on {len(trained)} classes that differ from the dataset's "
                         f"{len(categories)} (first differences: {differences})")
    config = DetectorConfig(**ckpt["model_config"])
    model = build_detector(config)
    model.load_state_dict(ckpt["model"])
    return model, config


def load_backbone(model: FasterRCNN, weights: dict, source: str | Path) -> dict:
    """Copy a pretrained ResNet body into the detector; stops loudly unless every body tensor was found."""
    try:
        result = model.backbone.body.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RuntimeError(f"{source}: backbone does not fit the detector: {exc}") from exc
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    report = {"loaded": len(weights) - len(result.unexpected_keys), "missing": list(result.missing_keys),
              "unexpected": unexpected}
    if result.missing_keys or unexpected:
        raise RuntimeError(f"{source}: backbone did not load: missing {result.missing_keys[:5]} "
                           f"({len(result.missing_keys)} in all), unexpected {unexpected[:5]} ({len(unexpected)})")
    log.info("backbone from %s: %d tensors loaded, 0 missing, 0 unexpected", source, report["loaded"])
    return report
