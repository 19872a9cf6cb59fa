"""Box geometry stays fp32 under autocast: anchors, decoding and the detections themselves.

Expected boxes come from the anchor and box-coder formulas written out in float64 here, not from torchvision.
Images are at the course's scale (short side 800-1024 px), where bf16 spaces representable coordinates 4-8 px
apart. Deltas are dyadic (exact in bf16 and fp16), so the only error left is the box arithmetic's.
"""
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from demo.fp32_boxes import ANCHOR_SIZES, ASPECT_RATIOS
from demo.model import DetectorConfig, build_detector
from moco.runtime.precision import autocast_dtype

HEIGHT, WIDTH = 1024, 1344  # padded to a multiple of 32, as the detector's transform does
STRIDES = (4, 8, 16, 32, 64)
TOLERANCE_PX = 0.1
CHANNELS = 16  # a narrow FPN: fp16 convolutions are slow on a CPU, and the width does not matter to boxes
DTYPES = [torch.bfloat16, torch.float16]
RPN_DELTAS = (0.125, -0.0625, 0.25, -0.1875)  # dx, dy, dw, dh
ROI_DELTAS = (1.25, -0.75, 0.5, -0.25)  # raw outputs; the RoI box coder divides by its weights (10, 10, 5, 5)


def reference_anchors() -> torch.Tensor:
    """Every anchor of the image, level by level, location by location (row-major), ratio by ratio, in float64."""
    levels = []
    for (size,), ratios, stride in zip(ANCHOR_SIZES, ASPECT_RATIOS, STRIDES):
        base = []
        for ratio in ratios:
            h_ratio = math.sqrt(ratio)
            w, h = size / h_ratio, size * h_ratio
            base.append([round(-w / 2), round(-h / 2), round(w / 2), round(h / 2)])
        base = torch.tensor(base, dtype=torch.float64)
        ys, xs = torch.meshgrid(torch.arange(HEIGHT // stride) * stride, torch.arange(WIDTH // stride) * stride,
                                indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).double()
        levels.append((shifts + base).reshape(-1, 4))
    return torch.cat(levels)


def reference_decode(anchors: torch.Tensor, deltas, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    dx, dy, dw, dh = (d / w for d, w in zip(deltas, weights))
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    cx, cy, w, h = cx + dx * w, cy + dy * h, w * math.exp(dw), h * math.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = build_detector(DetectorConfig("resnet18", 11, 5, "frozen", HEIGHT, WIDTH, 64, CHANNELS)).eval()
    with torch.no_grad():  # known deltas: zero weights, the deltas as biases
        model.rpn.head.bbox_pred.weight.zero_()
        model.rpn.head.bbox_pred.bias.copy_(torch.tensor(RPN_DELTAS).repeat(3))
        model.roi_heads.box_predictor.bbox_pred.weight.zero_()
        model.roi_heads.box_predictor.bbox_pred.bias.copy_(torch.tensor(ROI_DELTAS).repeat(11))
    return model


def feature_maps(dtype, channels=CHANNELS):
    """What the FPN hands the RPN under autocast: maps of the autocast dtype (values do not matter here)."""
    torch.manual_seed(1)
    return [torch.randn(1, channels, HEIGHT // s, WIDTH // s).to(dtype) for s in STRIDES]


def image_list():
    return ImageList(torch.empty(1, 3, HEIGHT, WIDTH), [(HEIGHT, WIDTH)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_anchors_are_fp32_and_exact_under_autocast(detector, dtype):
    expected = reference_anchors()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        [anchors] = detector.rpn.anchor_generator(image_list(), feature_maps(dtype))
        [stock] = AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS)(image_list(), feature_maps(dtype))
    assert anchors.dtype == torch.float32 and anchors.shape == expected.shape
    assert (anchors.double() - expected).abs().max() < 1e-3
    if dtype == torch.bfloat16:  # torchvision's own generator puts them on bf16's grid: pixels off at this scale
        assert (stock.double() - expected).abs().max() >= 4.0


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_rpn_decoding_of_known_deltas_agrees_with_fp32(detector, precision):
    """The RPN's own sequence: head, anchors, concatenation, decoding; under the default and each autocast dtype."""
    dtype = autocast_dtype(torch.device("cpu"), precision) or torch.float32
    rpn = detector.rpn
    features = feature_maps(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        objectness, deltas = rpn.head(features)
        anchors = rpn.anchor_generator(image_list(), features)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas, anchors).view(-1, 4)
    assert proposals.dtype == torch.float32 and objectness.dtype == torch.float32
    expected = reference_decode(reference_anchors(), RPN_DELTAS)
    assert (proposals.double() - expected).abs().max() < TOLERANCE_PX


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_roi_box_decoding_of_known_deltas_agrees_with_fp32(detector, precision):
    dtype = autocast_dtype(torch.device("cpu"), precision) or torch.float32
    roi = detector.roi_heads
    proposals = reference_anchors()[::997].float()  # boxes all over the image, up to its far corner
    proposals = proposals[(proposals[:, 2] > proposals[:, 0] + 8) & (proposals[:, 3] > proposals[:, 1] + 8)]
    pooled = torch.randn(len(proposals), CHANNELS, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        scores, regression = roi.box_predictor(roi.box_head(pooled.to(dtype)))
        boxes = roi.box_coder.decode(regression, [proposals]).view(len(proposals), -1, 4)
    assert scores.dtype == regression.dtype == boxes.dtype == torch.float32
    expected = reference_decode(proposals.double(), ROI_DELTAS, roi.box_coder.weights)
    assert (boxes.double() - expected[:, None]).abs().max() < TOLERANCE_PX


def test_detections_lie_on_the_fp32_anchor_grid_under_bf16(detector):
    """The whole detector under bf16 autocast, both heads predicting zero deltas: every detection is an anchor,
    clipped to the image, to within the tolerance (bf16 box math puts them up to 8 px off)."""
    model = build_detector(DetectorConfig("resnet18", 11, 5, "frozen", HEIGHT, WIDTH, 64, CHANNELS)).eval()
    model.load_state_dict(detector.state_dict())
    with torch.no_grad():
        for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    model.roi_heads.score_thresh = 0.0  # an untrained classifier scores about 1/11
    torch.manual_seed(2)
    image = torch.rand(3, HEIGHT, WIDTH)  # at min_size/max_size already: no resizing, boxes in image pixels
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        [out] = model([image])
    boxes = out["boxes"]
    assert boxes.dtype == torch.float32 and len(boxes) > 10
    grid = reference_anchors()
    grid[:, 0::2] = grid[:, 0::2].clamp(0, WIDTH)
    grid[:, 1::2] = grid[:, 1::2].clamp(0, HEIGHT)
    distance = torch.cdist(boxes.double(), grid, p=float("inf")).min(dim=1).values
    assert distance.max() < TOLERANCE_PX


def test_the_heads_last_layers_are_true_fp32_under_bf16_autocast():
    """The RPN's 1x1 convolutions and the box head's linear layers on their autocast inputs give exactly what fp32
    gives on the same inputs: no bf16 rounding of the scores and deltas (and, on CUDA, no TF32)."""
    torch.manual_seed(2)
    model = build_detector(DetectorConfig("resnet18", 11, 5, "frozen", 224, 320, 64, CHANNELS)).eval()
    rpn, predictor = model.rpn.head, model.roi_heads.box_predictor
    features = [torch.randn(1, CHANNELS, 8, 10), torch.randn(1, CHANNELS, 4, 5)]
    box_features = torch.randn(6, predictor.cls_score.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        objectness, deltas = rpn(features)
        scores, box_deltas = predictor(box_features.bfloat16())
        hidden = [rpn.conv(f).float() for f in features]  # the 3x3 convolution's bf16 output, as the head saw it
    with torch.no_grad():
        for t, o, d in zip(hidden, objectness, deltas):
            assert o.dtype == d.dtype == torch.float32
            assert torch.equal(o, rpn.cls_logits(t)) and torch.equal(d, rpn.bbox_pred(t))
        x = box_features.bfloat16().float()
        assert torch.equal(scores, predictor.cls_score(x)) and torch.equal(box_deltas, predictor.bbox_pred(x))
