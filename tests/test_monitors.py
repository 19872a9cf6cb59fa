"""The metrics that watch pretraining: key spread and the kNN probe, on inputs whose answers are known."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from moco.augment import Normalize
from moco.probe import KnnProbe, backbone_of, extract_features, knn_top1, load_crops
from moco.train import key_spread


def test_key_spread_is_about_one_for_spread_keys_and_zero_for_collapsed_ones():
    torch.manual_seed(0)
    spread = F.normalize(torch.randn(128, 4096), dim=0)  # dim x K, unit columns, as the queue
    assert key_spread(spread) == pytest.approx(1.0, abs=0.02)
    collapsed = F.normalize(torch.randn(128, 1), dim=0).repeat(1, 4096)
    assert key_spread(collapsed) == pytest.approx(0.0, abs=1e-6)


def test_key_spread_by_hand():
    # Keys alternate between e1 and e2 in 2 dimensions: each dimension is 1, 0, 1, 0 (sample std sqrt(1/3)).
    queue = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.bfloat16)
    assert key_spread(queue) == pytest.approx(math.sqrt(1 / 3) * math.sqrt(2), rel=1e-6)


def _course_split(root, split, images: dict[int, tuple[np.ndarray, str]]):
    (root / split / "images").mkdir(parents=True)
    (root / split / "labels").mkdir(parents=True)
    for number, (pixels, label) in images.items():
        Image.fromarray(pixels).save(root / split / "images" / f"{number}.PNG")
        (root / split / "labels" / f"{number}.yml").write_text(label)


def _pixels(seed: int, height: int = 30, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_crops_are_the_label_boxes_of_the_image(tmp_path):
    pixels = _pixels(0)
    # Box sides equal the crop size, so the resize keeps every pixel; 5.6 rounds to 6 (truncation would give 5).
    _course_split(tmp_path, "validation", {
        1: (pixels, "bboxes: [[4, 5.6, 16, 17.6], [20, 2, 32, 14]]\nlabels: [dog, zebra]\n"),
        2: (_pixels(1), "bboxes: [[0, 0, 12, 12]]\nlabels: [cup or mug]\n"),
    })
    crops, names = load_crops(tmp_path, "validation", size=12)
    assert names == ["dog", "zebra", "cup or mug"]
    assert crops.dtype == torch.uint8 and tuple(crops.shape) == (3, 3, 12, 12)
    assert np.array_equal(crops[0].permute(1, 2, 0).numpy(), pixels[6:18, 4:16])
    assert np.array_equal(crops[1].permute(1, 2, 0).numpy(), pixels[2:14, 20:32])
    assert np.array_equal(crops[2].permute(1, 2, 0).numpy(), _pixels(1)[0:12, 0:12])


def test_crops_are_resized_bilinearly(tmp_path):
    pixels = _pixels(2)
    _course_split(tmp_path, "validation", {1: (pixels, "bboxes: [[3, 2, 33, 22]]\nlabels: [dog]\n")})
    crops, _ = load_crops(tmp_path, "validation", size=9)
    expected = Image.fromarray(pixels).crop((3, 2, 33, 22)).resize((9, 9), Image.BILINEAR)
    assert np.array_equal(crops[0].permute(1, 2, 0).numpy(), np.asarray(expected))


def test_crops_are_resized_to_squares_and_spread_over_the_split(tmp_path):
    flat = {n: (np.full((30, 40, 3), 10 * n, dtype=np.uint8), "bboxes: [[1, 2, 30, 12]]\nlabels: [dog]\n")
            for n in range(1, 7)}
    _course_split(tmp_path, "training", flat)
    crops, names = load_crops(tmp_path, "training", size=8, max_images=3)
    assert tuple(crops.shape) == (3, 3, 8, 8) and names == ["dog"] * 3
    assert [int(c[0, 0, 0]) for c in crops] == [10, 30, 50]  # images 1, 3, 5: every other one, not 1, 2, 3
    assert load_crops(tmp_path, "training", size=8, max_images=10)[0].shape[0] == 6


def test_no_box_to_probe_is_an_error(tmp_path):
    _course_split(tmp_path, "validation", {1: (_pixels(0), "bboxes: []\nlabels: []\n")})
    with pytest.raises(ValueError, match="no boxes to probe with"):
        load_crops(tmp_path, "validation", size=8)


def _at_cosine(s: float) -> torch.Tensor:
    """A unit vector at cosine similarity s with e1."""
    return torch.tensor([s, math.sqrt(1 - s * s)])


def test_the_vote_is_weighted_by_exp_similarity_over_t():
    """Three class-0 neighbours at similarity 0.6 against two class-1 neighbours at 0.99: a majority vote says 0;
    the default weights exp(s / 0.07) say 1 (2 e^14.1 > 3 e^8.6). At T = 100, or even T = 1.07, the weights are
    nearly equal and the majority wins."""
    train = torch.stack([_at_cosine(0.6)] * 3 + [_at_cosine(0.99)] * 2)
    train_labels = torch.tensor([0, 0, 0, 1, 1])
    test, test_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_top1(train, train_labels, test, test_labels, k=5) == 1.0
    assert knn_top1(train, train_labels, test, test_labels, k=5, T=1.07) == 0.0
    assert knn_top1(train, train_labels, test, test_labels, k=5, T=100.0) == 0.0
    # Only the k nearest vote: with k = 2 the far majority is not consulted even at T = 100.
    assert knn_top1(train, train_labels, test, test_labels, k=2, T=100.0) == 1.0


def test_twenty_neighbours_vote_by_default():
    """Ten class-0 neighbours at 0.900 narrowly outvote ten class-1 ones at 0.899; a 21st (class 1, at 0.898)
    would tip the vote."""
    train = torch.stack([_at_cosine(0.9)] * 10 + [_at_cosine(0.899)] * 10 + [_at_cosine(0.898)])
    train_labels = torch.tensor([0] * 10 + [1] * 11)
    test, test_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_top1(train, train_labels, test, test_labels) == 1.0
    assert knn_top1(train, train_labels, test, test_labels, k=21) == 0.0


def test_knn_accuracy_is_the_fraction_of_correct_votes():
    train = torch.eye(3)
    train_labels = torch.tensor([0, 1, 2])
    test = torch.eye(3)[[0, 1, 2, 2]]
    assert knn_top1(train, train_labels, test, torch.tensor([0, 1, 2, 0]), k=1) == 0.75
    assert knn_top1(train, train_labels, test, torch.tensor([0, 1, 2, 2]), k=20) == 1.0  # k capped at 3 crops


class _MeanColour(nn.Module):
    """A 'ResNet' whose pooled feature is the mean colour of the (normalised) input; its head is a decoy."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_features_come_from_the_backbone_without_its_head_and_are_unit_vectors():
    encoder = _MeanColour()
    crops = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    crops[:, 0] = torch.tensor([0, 50, 100, 200, 255]).view(5, 1, 1)
    backbone = backbone_of(encoder)
    assert isinstance(encoder.fc, nn.Linear) and not backbone.training  # a copy, in eval mode
    feats = extract_features(backbone, crops, torch.device("cpu"), batch_size=2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = F.normalize((crops.float().mean(dim=(2, 3)) / 255 - mean) / std, dim=1)
    assert feats.shape == (5, 3) and torch.allclose(feats, expected, atol=1e-5)


def test_probe_scores_an_encoder_on_the_validation_crops(tmp_path):
    """Red objects are 'dog', blue ones 'zebra': a mean-colour backbone separates them perfectly."""
    def scene(colour, label):
        pixels = np.full((20, 20, 3), 128, dtype=np.uint8)
        pixels[4:14, 4:14] = colour
        return pixels, f"bboxes: [[4, 4, 14, 14]]\nlabels: [{label}]\n"

    red, blue, green = (230, 20, 20), (20, 20, 230), (20, 230, 20)
    _course_split(tmp_path, "training", {1: scene(red, "dog"), 2: scene(blue, "zebra"), 3: scene(red, "dog")})
    # A class seen only in validation still gets a label (and cannot be voted for).
    _course_split(tmp_path, "validation",
                  {4: scene(blue, "zebra"), 5: scene(red, "dog"), 6: scene(green, "cup or mug")})
    probe = KnnProbe(tmp_path, 8, torch.device("cpu"), k=1)
    assert probe.num_classes == 3 and tuple(probe.train_crops.shape) == (3, 3, 8, 8)
    assert probe.train_labels.tolist() == [1, 2, 1] and probe.val_labels.tolist() == [2, 1, 0]
    assert probe(_MeanColour()) == pytest.approx({"knn_top1": 2 / 3, "knn_top1_own_bn": 2 / 3})  # no BatchNorm
    fewer = KnnProbe(tmp_path, 8, torch.device("cpu"), k=1, max_images=2)
    # Images 1, 2 and 4, 5: "cup or mug" (image 6) is not loaded, so dog and zebra are labels 0 and 1.
    assert fewer.train_labels.tolist() == [0, 1] and fewer.val_labels.tolist() == [1, 0]


def test_recalibration_gives_batchnorm_the_statistics_of_the_crops_and_leaves_the_backbone_alone():
    from moco.batchnorm import SplitBatchNorm2d
    from moco.probe import recalibrated

    backbone = nn.Sequential(SplitBatchNorm2d(3, num_splits=4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    crops = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8)
    probe_ready = recalibrated(backbone, crops, torch.device("cpu"))  # batches of 6: no 4 sub-batches
    normalised = (crops.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    norm = probe_ready[0]
    assert not probe_ready.training and norm.num_splits == 1
    assert torch.allclose(norm.running_mean, normalised.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, normalised.var(dim=(0, 2, 3)), atol=1e-4)  # unbiased, as BatchNorm
    assert torch.equal(backbone[0].running_mean, torch.zeros(3)) and backbone[0].num_splits == 4
    two_batches = recalibrated(backbone, crops.repeat(2, 1, 1, 1), torch.device("cpu"))
    assert torch.allclose(two_batches[0].running_mean, norm.running_mean, atol=1e-5)


def test_device_normalisation_moves_the_batch_to_its_device_and_saves_nothing():
    normalize = Normalize().to("meta")
    assert normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).device.type == "meta"
    assert Normalize().state_dict() == {}  # constants, not checkpoint entries


def test_probe_passes_its_k_and_precision_on(tmp_path, monkeypatch):
    """The run's --probe-k and autocast dtype reach the vote and the feature pass (both spied on, then run)."""
    import moco.probe as probe_module

    pixels = np.full((20, 20, 3), 90, dtype=np.uint8)
    label = "bboxes: [[4, 4, 14, 14]]\nlabels: [dog]\n"
    _course_split(tmp_path, "training", {1: (pixels, label)})
    _course_split(tmp_path, "validation", {2: (pixels, label)})
    seen = {"amp": [], "k": []}
    extract, vote = probe_module.extract_features, probe_module.knn_top1

    def spy_extract(*args, **kwargs):
        seen["amp"].append(kwargs.get("amp_dtype"))
        return extract(*args, **kwargs)

    def spy_vote(*args, **kwargs):
        seen["k"].append(kwargs.get("k"))
        return vote(*args, **kwargs)

    monkeypatch.setattr(probe_module, "extract_features", spy_extract)
    monkeypatch.setattr(probe_module, "knn_top1", spy_vote)
    probe = KnnProbe(tmp_path, 8, torch.device("cpu"), k=7, amp_dtype=torch.bfloat16)
    assert probe(_MeanColour()) == {"knn_top1": 1.0, "knn_top1_own_bn": 1.0}
    # recalibration, then training and validation crops for each of the two scores
    assert seen == {"amp": [torch.bfloat16] * 5, "k": [7, 7]}


def _conv_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_features_follow_the_run_precision():
    crops = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fp32 = extract_features(_conv_backbone(), crops, torch.device("cpu"))
    bf16 = extract_features(_conv_backbone(), crops, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32  # features leave in fp32 whatever the autocast dtype
    fp16 = extract_features(_conv_backbone(), crops, torch.device("cpu"), amp_dtype=torch.float16)
    assert not torch.equal(fp16, bf16)  # the dtype asked for, not autocast's default for the device
    assert torch.allclose(bf16, fp32, atol=3e-2) and not torch.allclose(bf16, fp32, atol=1e-4)  # bf16 rounding


def test_probe_labels_live_on_the_run_device(tmp_path):
    pixels = np.full((20, 20, 3), 90, dtype=np.uint8)
    label = "bboxes: [[4, 4, 14, 14]]\nlabels: [dog]\n"
    _course_split(tmp_path, "training", {1: (pixels, label)})
    _course_split(tmp_path, "validation", {2: (pixels, label)})
    probe = KnnProbe(tmp_path, 8, torch.device("meta"))
    assert probe.train_labels.device.type == probe.val_labels.device.type == "meta"
