import pytest
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from demo.inference import fold_batchnorm, for_inference
from demo.model import DetectorConfig, build_detector

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def detector(arch: str, norm: str):
    """A small detector whose every norm layer holds statistics and affine terms far from identity, so a folding
    that skips a layer, swaps mean and variance or drops eps changes the features."""
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(arch=arch, norm=norm, trainable_layers=5 if norm == "sync" else 3,
                                          num_classes=5, min_size=64, max_size=96, fpn_channels=32))
    for module in model.backbone.body.modules():
        if isinstance(module, NORMS):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(1e-4, 2.0)  # down to the size of eps
    return model


@pytest.mark.parametrize("arch, norms", [("resnet18", 20), ("resnet50", 53)])
@pytest.mark.parametrize("norm", ["sync", "frozen"])
def test_folded_detector_computes_the_same_features(arch, norms, norm):
    model = detector(arch, norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = for_inference(model)

    assert sum(isinstance(m, NORMS) for m in model.backbone.body.modules()) == norms  # the input is untouched
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not folded.training
    assert not any(isinstance(m, NORMS) for m in folded.modules())
    convs = [m for m in folded.backbone.body.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == norms and all(c.bias is not None for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval().backbone(images)
        got = folded.backbone(images)
    for level, features in expected.items():
        error = (got[level] - features).norm() / features.norm()
        assert error < 1e-5, (level, error.item())


def test_folded_detector_finds_the_same_boxes():
    model = detector("resnet18", "sync").eval()
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(2))]
    model.roi_heads.score_thresh = 0.0  # every box the heads keep, so there is something to compare
    with torch.no_grad():
        expected, got = model(images)[0], for_inference(model)(images)[0]
    assert len(expected["boxes"]) > 10
    top = expected["scores"].argsort(descending=True)[:10]
    top_got = got["scores"].argsort(descending=True)[:10]
    # A random network's box regression magnifies fp32 rounding: a twentieth of a pixel is the bound.
    torch.testing.assert_close(got["boxes"][top_got], expected["boxes"][top], atol=0.05, rtol=0)
    torch.testing.assert_close(got["scores"][top_got], expected["scores"][top], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["labels"][top_got], expected["labels"][top])


def test_a_norm_without_running_statistics_is_refused():
    body = nn.Sequential()
    body.conv1, body.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        fold_batchnorm(body.eval())
