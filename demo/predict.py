"""Detections of a fine-tuned checkpoint on any image files: a picture an image, and one COCO results file.

    python -m demo.predict --checkpoint-path CKPT IMAGES... --output-dir OUT [--score-threshold 0.5]

IMAGES are files or folders. A folder stands for its own PNG and JPEG files (.png, .jpg, .jpeg in any case), not
its subfolders' (so pictures written to a folder inside it are not read back), in number order, then name order
(``2.png`` before ``10.png``); a file named on the command line is read whatever its extension. The checkpoint
alone defines the model and the class names.

Writes ``OUT/<stem>.png`` for every image, its detections at or above ``--score-threshold`` drawn (equal stems
get ``<stem>-2.png``, ``-3``, ...), ``OUT/detections.json``, those detections in COCO's results format plus each
image's ``file_name``, and ``OUT/images.json``, which maps the image ids to the files and pictures. Image ids are
the numbers in the file names when every name is a distinct number (the course's ``N.JPEG``: the results then
match its ground truth), else 1, 2, ... in order. An image that cannot be read is named in one line and passed
over; the others are written, and the exit status is then 65 (EX_DATAERR, as for unreadable training images).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from moco.course.images import UnreadableImage, image_size, is_image, load_rgb, number_key
from moco.runtime import checkpoint
from moco.runtime.devices import DeviceError, add_device_argument, configure_backends, select_device
from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.precision import add_inference_argument, autocast_dtype
from moco.runtime.unreadable import EXIT_DATAERR

from . import coco_eval, draw
from .datasets import label_to_category
from .engine import predict
from .inference import for_inference
from .model import detector_from_checkpoint, trained_categories

log = get_logger("demo.predict")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or folders of PNG/JPEG files")
    p.add_argument("--checkpoint-path", required=True, help="a demo.train checkpoint")
    p.add_argument("--output-dir", required=True, help="pictures, detections.json and images.json go here")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="detections kept, drawn and written; 0 keeps all the model gives (scores from 0.05)")
    p.add_argument("-b", "--batch-size", type=int, default=4, help="images a forward pass")
    p.add_argument("-j", "--workers", type=int, default=4, help="data-loader processes reading the images")
    add_inference_argument(p)
    add_device_argument(p)
    return p


def image_paths(arguments: list[str]) -> list[Path]:
    """The files the arguments name, folders expanded (see the module doc), each file once."""
    paths, seen = [], set()
    for argument in map(Path, arguments):
        if argument.is_dir():
            found = sorted((p for p in argument.iterdir() if p.is_file() and is_image(p.name)),
                           key=lambda p: (number_key(p), p.name))
            if not found:
                log.warning("%s: no PNG or JPEG files in this folder", argument)
        elif argument.is_file():
            found = [argument]
        else:
            raise FileNotFoundError(f"{argument}: no such file or folder")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def image_ids(paths: list[Path]) -> list[int]:
    """The numbers in the names when all are distinct numbers, else 1..N (see the module doc)."""
    numbers = [int(p.stem) if p.stem.isdigit() else None for p in paths]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(1, len(paths) + 1))


def picture_names(paths: list[Path]) -> list[str]:
    """``<stem>.png`` for each path, ``<stem>-2.png``, ``-3``... for a stem taken before (case aside, for
    case-insensitive filesystems)."""
    names, taken = [], set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}-{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


class ImageFiles(torch.utils.data.Dataset):
    """Unlabeled images for ``engine.predict``: items are ``(uint8 image, {"image_id"})``, or ``(None, {"image_id",
    "error"})`` for a file that does not decode, so that one bad file costs its own picture, not the run."""

    def __init__(self, paths: list[Path], ids: list[int], sizes: list[tuple[int, int]]):
        self.paths, self.ids, self.sizes = paths, ids, sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        target = {"image_id": self.ids[index]}
        try:
            return TF.pil_to_tensor(load_rgb(self.paths[index])), target
        except UnreadableImage as exc:
            return None, {**target, "error": str(exc)}

    def aspect_ratios(self) -> list[float]:
        return [width / height for width, height in self.sizes]


def main(argv: list[str] | None = None) -> list[dict]:
    """The images' records as in images.json; exits with EXIT_DATAERR after writing the rest if any failed."""
    args = get_parser().parse_args(argv)
    setup_logging()
    try:
        images = _predict(args)
    except (FileNotFoundError, ValueError, DeviceError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    failed = sum("error" in image for image in images)
    if failed:
        log.error("%d of %d images could not be read (named above); the other %d were written (exit status %d)",
                  failed, len(images), len(images) - failed, EXIT_DATAERR)
        raise SystemExit(EXIT_DATAERR)
    return images


def _predict(args: argparse.Namespace) -> list[dict]:
    paths = image_paths(args.images)
    if not paths:
        raise FileNotFoundError(f"{' '.join(args.images)}: no images")
    device = select_device(args.device)
    ckpt = checkpoint.load(args.checkpoint_path)
    categories = trained_categories(ckpt)
    model, _ = detector_from_checkpoint(ckpt, args.checkpoint_path, categories)
    model = for_inference(model).to(device)
    configure_backends(device, fixed_shapes=False)
    amp_dtype = autocast_dtype(device, args.precision, inference=True)
    log.info("%s (stage %s, epoch %s): %d images, %s, precision %s", args.checkpoint_path, ckpt.get("stage"),
             ckpt.get("epoch"), len(paths), device, amp_dtype or "fp32")

    images = [{"id": i, "path": str(p), "picture": name}
              for i, p, name in zip(image_ids(paths), paths, picture_names(paths))]
    readable = []
    for image, path in zip(images, paths):
        try:
            image["width"], image["height"] = image_size(path)
            readable.append((path, image))
        except UnreadableImage as exc:
            _fail(image, str(exc))
    dataset = ImageFiles([p for p, _ in readable], [im["id"] for _, im in readable],
                         [(im["width"], im["height"]) for _, im in readable])
    predictions = predict(model, dataset, device, amp_dtype, args.batch_size, args.workers) if readable else {}

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = label_to_category(categories)
    results = []
    for path, image in readable:
        output = predictions[image["id"]]
        if "error" in output:
            _fail(image, output["error"])
            continue
        found = [r for r in coco_eval.to_coco_results({image["id"]: output}, labels)
                 if r["score"] >= args.score_threshold]
        try:
            draw.annotate(load_rgb(path), found, categories).save(out / image["picture"])
        except UnreadableImage as exc:  # changed since it was read for the detector
            _fail(image, str(exc))
            continue
        image["detections"] = len(found)
        results += [{**r, "file_name": path.name} for r in found]
    (out / "detections.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(
        {"checkpoint": str(args.checkpoint_path), "score_threshold": args.score_threshold,
         "categories": [{"id": k, "name": v} for k, v in sorted(categories.items())], "images": images}, indent=1))
    log.info("%d pictures, %d detections at or above %g written to %s", sum(bool(im["picture"]) for im in images),
             len(results), args.score_threshold, out)
    return images


def _fail(image: dict, error: str) -> None:
    """Record an unreadable image and say so in one line, naming the file (the error does)."""
    image["picture"] = None
    image["error"] = " ".join(error.split())
    log.error("%s; passed over", image["error"])


if __name__ == "__main__":
    main()
