import pytest
import torch
import torchvision.models as tv_models
from torchvision.ops import FrozenBatchNorm2d

from demo.model import (
    DetectorConfig,
    build_detector,
    detector_from_checkpoint,
    infer_arch,
    load_backbone,
    read_backbone,
)

TINY = dict(arch="resnet18", min_size=64, max_size=96, rois_per_image=16, fpn_channels=32)


def body_state(model) -> dict:
    return {k: v.clone() for k, v in model.backbone.body.state_dict().items()}


def assert_body_equals(model, reference: dict):
    body = model.backbone.body.state_dict()
    assert body  # compare every body tensor, statistics included
    for key, value in body.items():
        assert torch.equal(value, reference[key]), key


def test_moco_checkpoint_body_arrives_unchanged(tmp_path, moco_state):
    """Our checkpoint and facebookresearch/moco's share this exact layout: module.encoder_q.*, encoder_k, queue."""
    path = tmp_path / "checkpoint_0200.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": moco_state, "optimizer": {}}, path)
    arch, weights = read_backbone(path)
    assert arch == "resnet18" and not any(k.startswith(("fc.", "encoder_k")) for k in weights)
    model = build_detector(DetectorConfig(num_classes=101, **{**TINY, "arch": arch}))
    report = load_backbone(model, weights, path)
    assert report["missing"] == [] and report["unexpected"] == []
    expected = {k[len("module.encoder_q."):]: v for k, v in moco_state.items() if k.startswith("module.encoder_q.")}
    assert_body_equals(model, expected)


def test_torchvision_state_dict_loads_and_arch_is_inferred(tmp_path):
    resnet = tv_models.resnet34()
    path = tmp_path / "resnet34.pth"
    torch.save(resnet.state_dict(), path)
    arch, weights = read_backbone(path)
    assert arch == "resnet34"
    model = build_detector(DetectorConfig(num_classes=5, **{**TINY, "arch": arch}))
    load_backbone(model, weights, path)
    assert_body_equals(model, resnet.state_dict())


def test_infer_arch_tells_bottlenecks_apart():
    assert infer_arch(tv_models.resnet50().state_dict()) == "resnet50"
    assert infer_arch(tv_models.resnet18().state_dict()) == "resnet18"


def test_backbone_that_does_not_fit_fails_loudly(tmp_path):
    path = tmp_path / "partial.pth"
    state = tv_models.resnet18().state_dict()
    torch.save({"arch": "resnet18", "state_dict": {k: v for k, v in state.items() if not k.startswith("layer4.")}},
               path)
    _, weights = read_backbone(path)
    model = build_detector(DetectorConfig(num_classes=5, **TINY))
    with pytest.raises(RuntimeError, match=r"partial\.pth: backbone did not load.*layer4"):
        load_backbone(model, weights, path)
    torch.save({"state_dict": {"module.encoder_k.conv1.weight": state["conv1.weight"]}}, path)
    with pytest.raises(RuntimeError, match="no ResNet weights"):
        read_backbone(path)


def test_roi_align_pools_from_every_fpn_level():
    model = build_detector(DetectorConfig(num_classes=101, **TINY))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.roi_heads.box_predictor.cls_score.out_features == 101


def test_frozen_batchnorm_stays_frozen_through_train_mode():
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(num_classes=3, trainable_layers=5, **TINY))
    norms = [m for m in model.backbone.body.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    before = {k: v.clone() for k, v in model.backbone.body.named_buffers()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images = [torch.rand(3, 80, 96) * 4, torch.rand(3, 72, 64) * 4]  # statistics far from the stored ones
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0]]), "labels": torch.tensor([2])}]
    loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()
    after = dict(model.backbone.body.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None  # the step did train the body


def test_trainable_layers_freeze_the_stem():
    model = build_detector(DetectorConfig(num_classes=3, trainable_layers=3, **TINY))
    body = model.backbone.body
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad


def test_sync_norm_refuses_frozen_stages():
    with pytest.raises(ValueError, match="trainable_layers 5"):
        DetectorConfig(norm="sync", trainable_layers=3)
    model = build_detector(DetectorConfig(num_classes=3, norm="sync", trainable_layers=5, **TINY))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())


def test_detector_checkpoint_refuses_other_classes():
    config = DetectorConfig(num_classes=3, **TINY)
    ckpt = {"model": build_detector(config).state_dict(), "model_config": config.to_dict(),
            "categories": [[1, "cup or mug"], [2, "bird"]]}
    model, rebuilt = detector_from_checkpoint(ckpt, "ft.pth", {1: "cup or mug", 2: "bird"})
    assert rebuilt == config
    with pytest.raises(ValueError, match=r"ft\.pth: trained on 2 classes that differ from the dataset's 2"):
        detector_from_checkpoint(ckpt, "ft.pth", {1: "cup or mug", 2: "zebra"})


def test_multiscale_training_draws_short_sides_and_evaluation_keeps_min_size():
    config = DetectorConfig(num_classes=3, **{**TINY, "train_min_sizes": [40, 48]})
    assert config.train_min_sizes == (40, 48) and DetectorConfig(**config.to_dict()) == config
    model = build_detector(config)
    image = torch.rand(3, 100, 150)
    torch.manual_seed(0)
    model.train()
    trained = {tuple(model.transform([image])[0].image_sizes[0]) for _ in range(40)}
    assert {min(s) for s in trained} == {40, 48, 64}  # the test size is drawn too
    model.eval()
    assert {tuple(model.transform([image])[0].image_sizes[0]) for _ in range(5)} == {(64, 96)}
    single = build_detector(DetectorConfig(num_classes=3, **TINY)).train()
    assert {tuple(single.transform([image])[0].image_sizes[0]) for _ in range(5)} == {(64, 96)}
