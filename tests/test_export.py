import argparse
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision.models as tv_models

from demo.model import DetectorConfig, build_detector, load_backbone, read_backbone
from moco import export

ENCODER = "module.encoder_q."
TINY_DETECTOR = DetectorConfig(arch="resnet18", num_classes=3, min_size=64, max_size=96, fpn_channels=32)
# detectron2's ResNet: the stem's conv and norm, then res2..res5 blocks of conv1..3 with norms and a shortcut.
D2_NAME = re.compile(r"(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))(\.norm)?"
                     r"\.(weight|bias|running_mean|running_var)")


@pytest.fixture
def moco_checkpoint(tmp_path, moco_state):
    """What moco.train writes at epoch 200 (facebookresearch/moco's releases have the same keys)."""
    path = tmp_path / "checkpoint_0200.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": moco_state, "optimizer": {}}, path)
    return path


@pytest.fixture
def body(moco_state) -> dict:
    """The query encoder's ResNet body in torchvision's names: what an export must hold, tensor for tensor."""
    return {k[len(ENCODER):]: v for k, v in moco_state.items() if k.startswith(ENCODER) and ".fc." not in k}


def resnet18_without_fc(state: dict) -> nn.Module:
    """moco.export's recipe: a torchvision export loads strictly once fc is an identity."""
    model = tv_models.resnet18(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    return model


def test_torchvision_export_is_the_body_and_loads_strict_without_fc(tmp_path, moco_checkpoint, body):
    out = export.main([str(moco_checkpoint), "--to", "torchvision", str(tmp_path / "r18.pth")])
    exported = torch.load(out, weights_only=True)
    assert sorted(exported) == sorted(body)  # no fc, no MLP head, no key encoder, every BN buffer
    for key, value in body.items():
        assert torch.equal(exported[key], value), key
    model = resnet18_without_fc(exported)
    assert torch.equal(model.layer1[0].bn1.running_var, body["layer1.0.bn1.running_var"])
    assert not list(tmp_path.glob(".*.tmp*"))  # the atomic write left no temporary file


def test_detectron2_export_renames_every_tensor_and_keeps_its_values(tmp_path, moco_checkpoint, body):
    out = export.main([str(moco_checkpoint), "--to", "detectron2", str(tmp_path / "r18.pkl")])
    with open(out, "rb") as f:
        d2 = pickle.load(f)
    assert d2["__author__"] == "MOCO" and d2["matching_heuristics"] is True
    model = d2["model"]
    kept = [k for k in body if not k.endswith("num_batches_tracked")]
    assert len(model) == len(kept) == 100  # resnet18: 20 convs, 20 norms of 4 tensors each
    for name in model:
        assert D2_NAME.fullmatch(name), name
    for key in kept:
        assert torch.equal(torch.from_numpy(model[export.detectron2_name(key)]), body[key]), key
    assert "res2.0.conv1.norm.running_var" in model and "stem.conv1.norm.running_mean" in model


@pytest.mark.parametrize("torchvision, detectron2", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_mean", "stem.conv1.norm.running_mean"),
    ("layer1.0.conv1.weight", "res2.0.conv1.weight"),
    ("layer1.0.bn2.bias", "res2.0.conv2.norm.bias"),
    ("layer4.2.bn3.running_var", "res5.2.conv3.norm.running_var"),
    ("layer2.0.downsample.0.weight", "res3.0.shortcut.weight"),
    ("layer3.0.downsample.1.weight", "res4.0.shortcut.norm.weight"),
])
def test_detectron2_names_follow_facebookresearch_moco(torchvision, detectron2):
    assert export.detectron2_name(torchvision) == detectron2


def test_torchvision_export_is_a_bp_for_the_detector(tmp_path, moco_checkpoint, body):
    out = export.main([str(moco_checkpoint), "--to", "torchvision", str(tmp_path / "r18.pth")])
    arch, weights = read_backbone(out)  # what demo.train --bp does
    assert arch == "resnet18"
    model = build_detector(TINY_DETECTOR)
    report = load_backbone(model, weights, out)
    assert report["missing"] == [] and report["unexpected"] == []
    for key, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, body[key]), key


def test_detector_body_exports_without_batch_counts(tmp_path):
    """A frozen-BN detector has no num_batches_tracked; BatchNorm fills it when the export is loaded."""
    detector = build_detector(TINY_DETECTOR)
    for module in detector.backbone.body.modules():
        if hasattr(module, "running_var"):
            module.running_var.uniform_(0.5, 2)
    source = tmp_path / "r3.pth"
    torch.save({"model": detector.state_dict(), "model_config": TINY_DETECTOR.to_dict()}, source)
    out = export.main([str(source), "--to", "torchvision", str(tmp_path / "r18.pth")])
    model = resnet18_without_fc(torch.load(out, weights_only=True))
    assert torch.equal(model.layer4[1].bn2.running_var, detector.backbone.body.layer4[1].bn2.running_var)


def _bad_inputs(tmp_path, moco_state):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with_code = tmp_path / "with_args.pth.tar"  # weights_only refuses it, in a paragraph of torch's
    torch.save({"args": argparse.Namespace(arch="resnet18"), "state_dict": moco_state}, with_code)
    no_resnet = tmp_path / "no_resnet.pth"
    torch.save({"state_dict": {k: v for k, v in moco_state.items() if not k.startswith(ENCODER)}}, no_resnet)
    no_arch = tmp_path / "three_stages.pth"  # blocks (2, 2, 2, 0): no ResNet that infer_arch knows
    torch.save({k: v for k, v in tv_models.resnet18().state_dict().items() if not k.startswith("layer4.")}, no_arch)
    return [(tmp_path / "missing.pth", "no such checkpoint"), (garbage, "not a readable checkpoint"),
            (with_code, "Unsupported global: GLOBAL argparse.Namespace"), (no_resnet, "no ResNet weights"),
            (no_arch, "cannot tell the ResNet")]


@pytest.mark.parametrize("to", export.FORMATS)
def test_bad_input_is_one_line_naming_the_file(tmp_path, moco_state, to):
    for path, reason in _bad_inputs(tmp_path, moco_state):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_:
            export.main([str(path), "--to", to, str(out)])
        message = str(exit_.value.code)
        assert message.startswith(f"error: {path}: ") and reason in message and "\n" not in message
        assert not out.exists()


def test_export_over_its_own_checkpoint_is_refused(moco_checkpoint):
    before = moco_checkpoint.read_bytes()
    with pytest.raises(SystemExit, match="is the checkpoint being exported"):
        export.main([str(moco_checkpoint), "--to", "torchvision", str(moco_checkpoint)])
    assert moco_checkpoint.read_bytes() == before


def test_unwritable_out_exits_with_ioerr(tmp_path, moco_checkpoint):
    out = tmp_path / "a_directory"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_:
        export.main([str(moco_checkpoint), "--to", "detectron2", str(out)])
    assert exit_.value.code == 74 and out.is_dir() and not list(tmp_path.glob(".*.tmp*"))


def test_command_line_exits_1_with_one_line(tmp_path, subprocess_env):
    missing = tmp_path / "missing.pth.tar"
    done = subprocess.run([sys.executable, "-m", "moco.export", str(missing), "--to", "torchvision",
                           str(tmp_path / "out.pth")], env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {missing}: no such checkpoint"
