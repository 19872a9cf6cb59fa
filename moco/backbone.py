"""A ResNet body's weights, with torchvision's key names, out of any checkpoint layout this project meets.

Here rather than in ``demo.model`` because ``moco.export`` needs them too, and ``moco`` never imports ``demo``.
The fc (or MoCo's MLP head) is left out: the body is what transfers.
"""
from __future__ import annotations

from pathlib import Path

from .runtime import checkpoint

_BODY_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")  # a ResNet without its fc
# Block counts of layer1..4 and whether blocks are bottlenecks: enough to name a checkpoint without 'arch'.
_RESNET_SHAPES = {
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152",
}


def backbone_weights(ckpt: dict) -> dict:
    """The ResNet body's tensors from any supported layout, with torchvision's ResNet key names."""
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    state = checkpoint.strip_prefix(state, "module.")
    for prefix in ("encoder_q.", "backbone.body."):  # MoCo (ours and facebookresearch/moco), our detectors
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if k.startswith(_BODY_PREFIXES) and hasattr(v, "shape")}


def infer_arch(weights: dict) -> str:
    blocks = tuple(
        1 + max((int(k.split(".")[1]) for k in weights if k.startswith(f"layer{i}.")), default=-1)
        for i in range(1, 5)
    )
    shape = (blocks, "layer1.0.conv3.weight" in weights)
    if shape not in _RESNET_SHAPES:
        raise ValueError(f"cannot tell the ResNet from its blocks {blocks}: the checkpoint needs an 'arch' entry")
    return _RESNET_SHAPES[shape]


def read_backbone(path: str | Path) -> tuple[str, dict]:
    """A backbone checkpoint's architecture (its 'arch' entry, else read from its shapes) and body weights."""
    ckpt = checkpoint.load(path)
    weights = backbone_weights(ckpt)
    if not weights:
        raise RuntimeError(f"{path}: no ResNet weights found (expected module.encoder_q.*, a torchvision ResNet "
                           f"state dict, or a detector's backbone.body.*)")
    try:
        return ckpt.get("arch") or infer_arch(weights), weights
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
