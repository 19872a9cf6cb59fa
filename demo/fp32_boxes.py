"""Box geometry in fp32 whatever the autocast dtype: anchors, box encoding and decoding, clipping and NMS.

torchvision builds anchors in the dtype of the feature maps and decodes boxes in the dtype of the regression
output, so under bf16 autocast every box lands on bf16's grid: 8 px apart at 1024-2048 px, 4 px at 512-1024
(anchor [1003.3, 701.7, 1250.9, 990.2] decodes to [1008, 704, 1248, 992]). That costs AP75 and small-object AP in
the training targets, the proposals and the detections. These drop-in subclasses keep the convolutions and
linear layers under autocast and hand fp32 to everything geometric. The last layers that score anchors and
regress boxes (the RPN's two 1x1 convolutions, the box head's two linear layers) run in true fp32 on their
autocast inputs (``moco.runtime.precision.true_fp32``: no bf16 rounding of their outputs, no TF32), for a few
thousandths of the detector's arithmetic. Their weights keep torchvision's names, so checkpoints load either way.
"""
from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from moco.runtime.precision import true_fp32

# torchvision's FPN defaults: one anchor size per level (P2..P6), three aspect ratios each.
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)


class Float32AnchorGenerator(AnchorGenerator):
    def __init__(self, sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS):
        super().__init__(sizes, aspect_ratios)

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # Only the maps' sizes, device and dtype are read: empty fp32 stand-ins make fp32 anchors, at no cost.
        shapes = [torch.empty((0, *f.shape[-2:]), device=f.device) for f in feature_maps]
        return super().forward(image_list, shapes)


class Float32RPNHead(RPNHead):
    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        objectness, deltas = [], []
        for feature in x:
            t = self.conv(feature)  # the 3x3 convolution stays under autocast
            with true_fp32(t.device.type):
                t = t.float()
                objectness.append(self.cls_logits(t))
                deltas.append(self.bbox_pred(t))
        return objectness, deltas


class Float32FastRCNNPredictor(FastRCNNPredictor):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with true_fp32(x.device.type):
            return super().forward(x.float())
