"""A pretrained ResNet body in the file format another code base loads.

    python -m moco.export CHECKPOINT --to torchvision|detectron2 OUT

CHECKPOINT is anything ``demo.train --bp`` reads (``moco.backbone``): a moco.train checkpoint, a released
facebookresearch/moco one, a torchvision ResNet state dict, a demo.train detector. Only the body is exported: no
fc, no MoCo MLP head, no key encoder.

- ``torchvision``: a plain ``torch.save``'d state dict with torchvision's key names (``conv1.weight``,
  ``layer1.0.bn1.running_mean``, ...), BatchNorm statistics included. It has no fc, so it loads strictly into a
  ResNet whose fc is replaced by an identity::

      model = torchvision.models.resnet50(weights=None)
      model.fc = torch.nn.Identity()
      model.load_state_dict(torch.load(OUT), strict=True)

  The architecture is logged, not stored: the file stays a state dict that any tool can load.
- ``detectron2``: the pickle detectron2's checkpointer reads, laid out as facebookresearch/moco's
  ``detection/convert-pretrain-to-detectron2.py`` writes it: ``{"model": {name: numpy array}, "__author__": "MOCO",
  "matching_heuristics": True}``, names in detectron2's ResNet (``stem.conv1.norm.weight``,
  ``res2.0.conv1.norm.running_var``, ``res3.0.shortcut.norm.bias``), ``num_batches_tracked`` left out. Give it as
  ``MODEL.WEIGHTS`` with the settings of that repository's ``*_moco.yaml`` configs, since the body was trained on
  torchvision's input: ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``, ``PIXEL_STD
  [58.395, 57.120, 57.375]`` and ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (torchvision strides in the 3x3 conv).

OUT is written atomically, and may not be CHECKPOINT itself. Exit status: 0 written; 1 an input to fix, said in one
line ("error: ..."); 74 (EX_IOERR) OUT could not be written (``moco.runtime.failures``).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

from .backbone import read_backbone
from .runtime import checkpoint, failures
from .runtime.logger import get_logger, setup_logging

log = get_logger("moco.export")

FORMATS = ("torchvision", "detectron2")
_STEM_BN_OR_BLOCK_BN = re.compile(r"(^|\.)bn(\d)\.")


def detectron2_name(key: str) -> str:
    """torchvision's ResNet key -> detectron2's: conv1/bn1 -> stem.conv1(.norm), layerN -> res{N+1},
    bnK -> convK.norm, downsample.0/.1 -> shortcut(.norm); the leaf (weight, running_var, ...) is kept."""
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m[1]) + 1}.", key)
    if name == key:
        name = f"stem.{key}"
    name = _STEM_BN_OR_BLOCK_BN.sub(r"\1conv\2.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def detectron2_model(weights: dict) -> dict:
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in weights.items()
             if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def export(source: str | Path, to: str, out: str | Path) -> Path:
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"{out}: is the checkpoint being exported; name another file")
    try:
        arch, weights = read_backbone(source)
    except RuntimeError as exc:  # read_backbone's "no ResNet weights", a RuntimeError for its other callers
        raise ValueError(str(exc)) from exc
    if to == "torchvision":
        checkpoint.save_atomic(weights, out)
        log.info("%s: %s body, %d tensors -> %s; load it strictly into torchvision.models.%s(weights=None) whose fc "
                 "is nn.Identity()", source, arch, len(weights), out, arch)
    else:
        d2 = detectron2_model(weights)
        checkpoint.save_atomic(d2, out, dump=pickle.dump)
        log.info("%s: %s body, %d arrays in detectron2's names -> %s", source, arch, len(d2["model"]), out)
    return Path(out)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moco.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a MoCo checkpoint (ours or facebookresearch/moco's), a torchvision ResNet "
                                      "state dict or a demo.train detector")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="torchvision: the body's state dict, no fc; detectron2: a pickle for its MODEL.WEIGHTS")
    p.add_argument("out", help="the file to write")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = get_parser().parse_args(argv)
    setup_logging()
    try:
        return export(args.checkpoint, args.to, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    except checkpoint.WriteError as exc:
        log.error("%s (exit status %d)", exc, failures.EXIT_IOERR)
        raise SystemExit(failures.EXIT_IOERR) from exc


if __name__ == "__main__":
    main()
