"""make compare's bookkeeping: the random backbones it probes are those fine-tuning starts from, and the summary."""
import pytest
import torch

from demo.compare import mean_std, random_backbone, summarise, table
from demo.model import DetectorConfig, build_detector


def test_random_backbone_is_the_one_random_init_fine_tuning_starts_from():
    torch.manual_seed(1)  # what demo.train does before building the detector without --bp
    body = build_detector(DetectorConfig(arch="resnet18", num_classes=3, norm="sync", trainable_layers=5,
                                         fpn_channels=32)).backbone.body.state_dict()
    probed = random_backbone("resnet18", 1).state_dict()
    assert body.keys() <= probed.keys()
    assert all(torch.equal(body[k], probed[k]) for k in body)
    assert not torch.equal(random_backbone("resnet18", 2).conv1.weight, probed["conv1.weight"])


def test_summary_gives_mean_and_sample_std_per_init_and_the_difference():
    scores = {"moco": [{"AP": 0.40, "AP50": 0.7, "AP75": 0.4}, {"AP": 0.44, "AP50": 0.8, "AP75": 0.5}],
              "random": [{"AP": 0.30, "AP50": 0.6, "AP75": 0.3}, {"AP": 0.30, "AP50": 0.6, "AP75": 0.3}]}
    knn = {"moco": [{"knn_top1": 0.6, "knn_top1_own_bn": 0.5}] * 2,
           "random": [{"knn_top1": 0.4, "knn_top1_own_bn": 0.6}, {"knn_top1": 0.5, "knn_top1_own_bn": 0.6}]}
    summary = summarise(scores, knn)
    assert summary["moco"]["AP"] == pytest.approx((0.42, 0.0282843), abs=1e-6)
    assert summary["random"]["AP"] == pytest.approx((0.30, 0.0))
    assert summary["random"]["knn_top1"] == pytest.approx((0.45, 0.0707107), abs=1e-6)
    assert summary["difference"]["AP"] == pytest.approx(0.12) and summary["difference"]["AP50"] == pytest.approx(0.15)
    assert summary["difference"]["knn_top1_own_bn"] == pytest.approx(-0.1)
    lines = table(summary, [0, 1]).splitlines()
    assert lines[1].split()[:4] == ["moco", "0.420", "±", "0.028"]
    assert lines[3].split()[:2] == ["moco-rnd", "+0.120"]
    assert mean_std([0.5]) == (0.5, 0.0)
