"""A fine-tuned detector as one ONNX file that onnxruntime runs on a CPU, checked against PyTorch before it is written.

    python -m demo.onnx_export --checkpoint-path CKPT OUT.onnx [--opset 17] [--image-size H W] [--verify IMAGE...]

The graph is the whole eval-mode detector of ``demo.model``, so a caller needs nothing but the file: resizing (short
side ``min_size``, long side at most ``max_size``) and normalisation, backbone, RPN, box head, NMS, boxes scaled back
to the input's pixels.

- input ``image``: float32 [3, H, W], RGB in [0, 1], one image a run, any H and W (the sizes are dynamic axes);
- outputs ``boxes`` float32 [N, 4] (x1, y1, x2, y2 in the input's pixels), ``labels`` int64 [N] (the model's 1..C),
  ``scores`` float32 [N], best first; N <= 100 and scores >= 0.05 (torchvision's defaults);
- metadata ``categories``: JSON ``[[label, category id, name], ...]``, to name the labels without the checkpoint;
  ``model_config`` and ``checkpoint`` say where it came from.

The exporter is torch's TorchScript-based one (``dynamo=False``): torchvision's detection code carries ONNX paths for
its tracer (image sizes kept symbolic, top-k, NMS and RoIAlign symbolics), while ``torch.export``, under which the
dynamo exporter runs, stops at the data-dependent number of boxes (pytorch/pytorch#146152). A trace records the path
of one image; the check below confirms that it holds at other sizes. One of torchvision's traced steps is replaced:
its resize computes sizes in float32 and misses eager PyTorch's by a pixel for about one image size in three
(``ExportTransform``).

Before anything is written, onnxruntime and PyTorch run on a synthetic image of ``--image-size``, on one of another
shape and on each ``--verify`` image; their detections are paired (same label, score within ``--score-tolerance``,
nearest box) and the largest differences logged. Detections with near-equal scores may come in another order, which
is no difference; one found on a single side is tolerated only at the cut (its score within the tolerance of the
lowest kept there: 0.05, or the 100th's).

Exit status: 0 written; 1 an input to fix, or onnx/onnxruntime not installed, said in one line ("error: ..."); 70
(EX_SOFTWARE) ONNX and PyTorch disagree beyond the tolerances, nothing written; 74 (EX_IOERR) OUT could not be
written.
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _get_shape_onnx
from torchvision.transforms.v2 import functional as TF

from moco.course.images import UnreadableImage, load_rgb
from moco.runtime import checkpoint
from moco.runtime.failures import EXIT_IOERR
from moco.runtime.logger import get_logger, setup_logging

from .datasets import label_to_category
from .model import detector_from_checkpoint, trained_categories

log = get_logger("demo.onnx_export")

DEFAULT_OPSET = 17  # ONNX 1.12 (2022): onnxruntime 1.12+, TensorRT 8.6+; torchvision's symbolics need 11+
MAX_OPSET = 20  # the TorchScript-based exporter's last
EXIT_MISMATCH = 70  # EX_SOFTWARE: the exporter, not the user's input, is at fault
OUTPUTS = ("boxes", "labels", "scores")
BOX_TOLERANCE = 1.0  # pixels of the input image
SCORE_TOLERANCE = 1e-4


class MissingPackage(RuntimeError):
    """onnx or onnxruntime is not installed: only the export needs them, so requirements.txt leaves them out."""


class Mismatch(RuntimeError):
    """The ONNX model's detections differ from PyTorch's beyond the tolerances."""


def runtime():
    """The ``onnx`` and ``onnxruntime`` modules, or a one-line ``MissingPackage`` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingPackage(f"{exc.name or exc} is not installed: the ONNX export needs onnx and onnxruntime "
                             "(pip install onnx onnxruntime; requirements-test.txt lists them)") from exc
    return onnx, onnxruntime


class ExportTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that a traced resize sizes the image as eager PyTorch does.

    torchvision's traced resize computes the scale in float32 as ``1 / short side * min_size``, so that for about one
    short side in three (198 px at min_size 224, 55 at 128) ``floor(short side * scale)`` is a pixel off eager
    PyTorch's size: every box of such an image moves by pixels and its scores by hundredths. Eager PyTorch computes
    ``int(side * min(min_size / short, max_size / long))`` in Python floats, which float64 tensors repeat exactly."""

    def resize(self, image: torch.Tensor, target: dict | None = None):
        if not torchvision._is_tracing() or target is not None or self.fixed_size is not None:
            return super().resize(image, target)
        shape = _get_shape_onnx(image).to(torch.float64)
        limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
        scale = torch.min(limits / torch.stack([shape.min(), shape.max()]))
        size = torch.floor(shape * scale).to(torch.int64)
        return F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0], target


def for_export(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with ``ExportTransform``, which changes nothing outside a trace."""
    t = model.transform
    model.transform = ExportTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                      t.fixed_size)
    return model.eval()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """The traced eval-mode ``model`` as ONNX bytes, image height and width dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer warns about every Python value torchvision reads off a tensor, and torch about its legacy
        # exporter; they are expected here, and the check against PyTorch at other sizes is what tells.
        warnings.simplefilter("ignore")
        torch.onnx.export(for_export(model), ([example],), buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(OUTPUTS),
                          dynamic_axes={"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in OUTPUTS}})
    return buffer.getvalue()


def with_metadata(onnx_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """The model with ``metadata`` in its metadata_props (replacing equal keys), after onnx's checker has passed it."""
    onnx, _ = runtime()
    proto = onnx.load_from_string(onnx_bytes)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def session(onnx_bytes: bytes):
    """An onnxruntime CPU session of the model; its own log limited to errors."""
    _, ort = runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(sess, image: torch.Tensor) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"image": image.numpy()})))


@torch.inference_mode()
def run_torch(model: torch.nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    detections = model.eval()([image])[0]
    return {k: detections[k].numpy() for k in OUTPUTS}


def image_tensor(path: str | Path) -> torch.Tensor:
    """A file as the model's input: float32 [3, H, W] in [0, 1], upright (``moco.course.images.load_rgb``)."""
    return TF.to_dtype(TF.pil_to_tensor(load_rgb(path)), torch.float32, scale=True)


def synthetic(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


@dataclass
class Comparison:
    """PyTorch's and onnxruntime's detections on one image, paired. ``box``: the largest coordinate difference of a
    pair in pixels; ``score``: of the scores; ``at_cut``, ``unpaired``: detections found on one side only, tolerated
    or not (see ``compare``), as (side, label, score)."""
    name: str
    torch_count: int
    onnx_count: int
    pairs: int = 0
    box: float = 0.0
    score: float = 0.0
    at_cut: list[tuple[str, int, float]] = field(default_factory=list)
    unpaired: list[tuple[str, int, float]] = field(default_factory=list)

    def agrees(self, box_tolerance: float) -> bool:
        return self.box <= box_tolerance and not self.unpaired

    def summary(self) -> str:
        text = (f"{self.name}: {self.torch_count} detections from PyTorch, {self.onnx_count} from ONNX, "
                f"{self.pairs} paired; largest differences: box {self.box:.3g} px, score {self.score:.3g}")
        if self.at_cut:
            text += f"; {len(self.at_cut)} on one side at the cut"
        if self.unpaired:
            shown = ", ".join(f"{side} label {label} score {score:.4f}" for side, label, score in self.unpaired[:3])
            text += f"; {len(self.unpaired)} on one side only ({shown})"
        return text


def compare(name: str, expected: dict[str, np.ndarray], found: dict[str, np.ndarray],
            score_tolerance: float = SCORE_TOLERANCE) -> Comparison:
    """Pair each of PyTorch's detections (``expected``) with the nearest box among ONNX's (``found``) of its label
    and a score within ``score_tolerance``, greedily, best first: near-equal scores may come in either order.

    A detection left without a partner is ``at_cut`` when its score is within the tolerance of the lowest score on
    its side: the 0.05 threshold or the 100-detection limit can fall on either side of a near-equal pair. Any other
    is ``unpaired``: a real difference."""
    result = Comparison(name, len(expected["scores"]), len(found["scores"]))
    taken = np.zeros(len(found["scores"]), dtype=bool)
    paired = np.zeros(len(expected["scores"]), dtype=bool)
    for i, (box, label, score) in enumerate(zip(expected["boxes"], expected["labels"], expected["scores"])):
        candidates = np.flatnonzero(~taken & (found["labels"] == label)
                                    & (np.abs(found["scores"] - score) <= score_tolerance))
        if not candidates.size:
            continue
        distances = np.abs(found["boxes"][candidates] - box).max(axis=1)
        j = candidates[distances.argmin()]
        taken[j] = paired[i] = True
        result.pairs += 1
        result.box = max(result.box, float(distances.min()))
        result.score = max(result.score, float(abs(found["scores"][j] - score)))
    for side, outputs, done in (("PyTorch", expected, paired), ("ONNX", found, taken)):
        lowest = outputs["scores"].min() if len(outputs["scores"]) else 0.0
        for label, score in zip(outputs["labels"][~done], outputs["scores"][~done]):
            kind = result.at_cut if score <= lowest + score_tolerance else result.unpaired
            kind.append((side, int(label), float(score)))
    return result


def check(model: torch.nn.Module, sess, images: list[tuple[str, torch.Tensor]], box_tolerance: float = BOX_TOLERANCE,
          score_tolerance: float = SCORE_TOLERANCE) -> list[Comparison]:
    """Compare onnxruntime's detections with PyTorch's on each named image; log each; ``Mismatch`` on the first
    that differs beyond the tolerances."""
    comparisons = []
    for name, image in images:
        comparison = compare(name, run_torch(model, image), run_onnx(sess, image), score_tolerance)
        log.info("check %s", comparison.summary())
        if not comparison.agrees(box_tolerance):
            raise Mismatch(f"ONNX and PyTorch disagree on {comparison.summary()} (tolerances: box {box_tolerance:g} "
                           f"px, score {score_tolerance:g})")
        comparisons.append(comparison)
    if not any(c.pairs for c in comparisons):
        log.warning("no detections on the check images, so only empty outputs were compared: give --verify images "
                    "with objects the model finds")
    return comparisons


def export(source: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, image_size: tuple[int, int] | None = None,
           verify: list[str | Path] = (), box_tolerance: float = BOX_TOLERANCE,
           score_tolerance: float = SCORE_TOLERANCE) -> Path:
    """Export the detector of checkpoint ``source`` to ``out``, written atomically once the check has passed."""
    runtime()  # before any slow work
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"{out}: is the checkpoint being exported; name another file")
    ckpt = checkpoint.load(source)
    categories = trained_categories(ckpt)
    model, config = detector_from_checkpoint(ckpt, source, categories)
    model.eval()
    del ckpt  # its optimizer state is as large as the model
    images = [(str(path), image_tensor(path)) for path in verify]  # an unreadable one stops before the export
    height, width = image_size or (config.min_size, min(config.max_size, config.min_size * 4 // 3))
    if min(height, width) < 1:
        raise ValueError(f"--image-size {height} {width}: sides of 1 pixel or more")
    example = synthetic(height, width)
    other = (width, height) if width != height else (height, width + 32)  # another shape: are the sizes symbolic?
    images = [(f"synthetic {height}x{width}", example), (f"synthetic {other[0]}x{other[1]}", synthetic(*other, 1)),
              *images]

    onnx_bytes = export_onnx(model, example, opset)
    labels = label_to_category(categories)
    onnx_bytes = with_metadata(onnx_bytes, {
        "categories": json.dumps([[label, cat, categories[cat]] for label, cat in labels.items()]),
        "model_config": json.dumps(config.to_dict()), "checkpoint": str(source)})
    check(model, session(onnx_bytes), images, box_tolerance, score_tolerance)
    checkpoint.save_atomic(onnx_bytes, out, dump=lambda data, f: f.write(data))
    log.info("%s -> %s (opset %d, %.1f MB): input 'image' float32 [3, H, W] in [0, 1], any H and W; outputs %s",
             source, out, opset, len(onnx_bytes) / 2**20, ", ".join(OUTPUTS))
    return Path(out)


def _opset(text: str) -> int:
    value = int(text)
    if not 11 <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"{value}: 11 (torchvision's NMS and RoIAlign) to {MAX_OPSET}")
    return value


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.onnx_export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint-path", required=True, help="a demo.train checkpoint")
    p.add_argument("out", help="the ONNX file to write")
    p.add_argument("--opset", type=_opset, default=DEFAULT_OPSET, help=f"ONNX opset, 11 to {MAX_OPSET}")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the synthetic image traced and checked (any size runs after); none: min_size by 4/3 of it")
    p.add_argument("--verify", nargs="+", default=[], metavar="IMAGE",
                   help="image files to compare ONNX and PyTorch on, besides the synthetic ones")
    p.add_argument("--box-tolerance", type=float, default=BOX_TOLERANCE, help="pixels")
    p.add_argument("--score-tolerance", type=float, default=SCORE_TOLERANCE)
    return p


def main(argv: list[str] | None = None) -> Path:
    args = get_parser().parse_args(argv)
    setup_logging()
    try:
        return export(args.checkpoint_path, args.out, args.opset, args.image_size, args.verify, args.box_tolerance,
                      args.score_tolerance)
    except (FileNotFoundError, ValueError, UnreadableImage, MissingPackage) as exc:
        raise SystemExit(f"error: {exc}") from exc
    except Mismatch as exc:
        log.error("%s: %s; nothing written (exit status %d)", args.out, exc, EXIT_MISMATCH)
        raise SystemExit(EXIT_MISMATCH) from exc
    except checkpoint.WriteError as exc:
        log.error("%s (exit status %d)", exc, EXIT_IOERR)
        raise SystemExit(EXIT_IOERR) from exc


if __name__ == "__main__":
    main()
