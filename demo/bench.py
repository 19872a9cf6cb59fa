"""`make bench`: the project's defaults against the original project's way, as ratios measured in one run.

    python -m demo.bench [--output-dir runs/bench] [--rounds 3] [--quick] [--only KIND...]

Each row times a piece of work done two or three ways ("variants"). The first variant is the baseline, the way the
original project did it: fp32, contiguous tensors, plain BatchNorm, facebookresearch/moco's aug+ with
ToTensor/Normalize per image, torchvision's Faster R-CNN as its detection reference builds it without weights
(BatchNorm trained in every stage, one image size), and pycocotools. "ours" is what this project's defaults run
on the device at hand (autocast dtype and memory format as moco.train and demo.train choose them; on a CPU
without native bf16 that is fp32 and contiguous; detection trains at short sides drawn from 0.6x to 1x the size).

The machine may be shared and noisy, so no absolute time is a result: every variant lives in its own process
(built and warmed up once), and the rounds alternate between the variants, so slow spells hit all of them. A row's
figure is the median over rounds; its ratio is against the baseline's median. Each process's peak memory is
reported (resident set on the CPU, the allocator's peak on CUDA). The table is printed and written, with the
device and versions, to ``<output-dir>/bench.json``.

MoCo rows also give the share of the machine's matrix-multiply peak the step reaches: the step's FLOPs (counted by
torch's FlopCounterMode) per second over a large matmul's FLOPs per second, both measured in this run, in the
step's dtype and in bf16. Each variant's first step (its warm-up) is timed apart from the rounds.

``--only compile`` adds a row no other run includes: the demo's MoCo step as "ours", eager against the same model
with both encoders under ``torch.compile``; its warm-up is the compilation. (No option of the trainer compiles:
on the CPUs measured the compiled step was slower, after minutes of compiling; see the README's Performance.)
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from torchvision.datasets.folder import pil_loader

from moco import train as moco_train
from moco.augment import IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, Normalize, TwoCropsTransform, moco_augmentation
from moco.course.images import load_rgb
from moco.data import UnlabeledImages, find_unlabeled_images
from moco.runtime import failures
from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.precision import autocast_dtype, optimizer_step
from moco.runtime.unreadable import UnreadableFiles

from . import coco_eval
from .inference import for_inference
from .model import DetectorConfig, build_detector
from .recipe import DEFAULT_PROTOCOL, PROTOCOLS, multiscale_sizes

log = get_logger("demo.bench")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # which builder makes its work: a key of BUILDERS
    variants: tuple[str, ...]  # the first is the baseline
    params: dict = field(default_factory=dict)
    on_request: bool = False  # run only when --only names its kind (it takes minutes that no ratio goal needs)

    @property
    def unit(self) -> str:  # throughput for steps over images; seconds for a whole evaluation
        return "s" if self.kind == "coco" else "img/s"


def rows(quick: bool, data: Path) -> list[Row]:
    """The benchmark; ``quick`` shrinks every row to seconds (the tests' size), keeping its code path."""
    moco_cases = [("resnet18", 32, 16, 64)] if quick else [("resnet18", 64, 64, 4096), ("resnet50", 224, 32, 4096)]
    arch, px, batch, K = moco_cases[0]  # the demo's MoCo step, for torch.compile
    detector, size, rois = ("resnet18", 64, 16) if quick else ("resnet50", 800, 512)  # 512: torchvision's
    images, classes, detections = (50, 10, 20) if quick else (20000, 100, 50)
    pair = ("original", "ours")
    epoch = dict(arch="resnet18", size=32, batch=16, K=64, images=32) if quick else dict(
        arch="resnet18", size=64, batch=64, K=512, images=640)  # the demo's model; 10 of its 47 steps an epoch
    return [
        *(Row(f"MoCo step, {arch}, {px} px, batch {batch}", "moco", ("original", "ours, --bn-splits 1", "ours"),
              dict(arch=arch, size=px, batch=batch, K=K)) for arch, px, batch, K in moco_cases),
        Row(f"input pipeline, PNG + two aug+ views at {32 if quick else 224}", "pipeline", pair,
            dict(data=str(data), size=32 if quick else 224)),
        Row(f"pretraining epoch, {epoch['images']} PNGs, {epoch['arch']}, {epoch['size']} px, "
            f"batch {epoch['batch']}, 1 worker", "epoch", pair, dict(data=str(data), workers=1, **epoch)),
        *(Row(f"detection {'train step' if train else 'inference'}, {detector}, 2 images at {size}", "detection",
              pair, dict(arch=detector, size=size, rois=rois, train=train)) for train in (True, False)),
        Row(f"COCO evaluation, {images:,} images x {classes} classes", "coco", ("pycocotools", "faster"),
            dict(images=images, classes=classes, detections=detections)),
        Row(f"MoCo step, {arch}, {px} px, batch {batch}, torch.compile", "compile", ("ours", "ours, torch.compile"),
            dict(arch=arch, size=px, batch=batch, K=K), on_request=True),
    ]


# ---- the work of each row: build(variant, params, device) returns step(), which returns the items it processed

def _moco_model(variant: str, p: dict, device: torch.device, *flags: str, uint8_views: bool = True):
    """moco.train's arguments and model for a variant: "ours" at moco.train's single-process defaults (split BN, the
    device's precision and memory format), "ours, --bn-splits 1" with plain BN, "original" in fp32, contiguous,
    with plain BN. The model normalises uint8 views itself unless ``uint8_views`` is off (float views in).
    Returns (args, model, autocast dtype or None, memory format)."""
    ours = variant.startswith("ours")
    amp_dtype = autocast_dtype(device) if ours else None
    memory_format = torch.channels_last if ours and moco_train.default_channels_last(device, amp_dtype) else (
        torch.contiguous_format)
    argv = ["-", "-a", p["arch"], "--moco-k", str(p["K"]), "--mlp", *flags]
    args = moco_train.get_parser().parse_args(argv + ([] if variant == "ours" else ["--bn-splits", "1"]))
    model = moco_train.build_model(args, 1, Normalize(memory_format=memory_format) if uint8_views else None)
    return args, model.to(device, memory_format=memory_format), amp_dtype, memory_format


def _moco_step(variant: str, p: dict, device: torch.device):
    compiled = variant.endswith("torch.compile")
    _, model, amp_dtype, memory_format = _moco_model("ours" if compiled else variant, p, device, "--moco-t", "0.2")
    if compiled:  # in place, so parameter names (and checkpoints) stay those of the eager model
        model.encoder_q.compile()
        model.encoder_k.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    images = torch.randint(0, 256, (2, p["batch"], 3, p["size"], p["size"]), dtype=torch.uint8)

    def step() -> int:
        im_q, im_k = images[0].to(device), images[1].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, labels = model(im_q, im_k)
        optimizer_step(F.cross_entropy(logits, labels), optimizer, None)
        return p["batch"]

    if not compiled:  # FlopCounterMode around the first call would be traced into the compiled graph
        step.flops = lambda: _count_flops(step)
    step.dtype = amp_dtype or torch.float32
    return step


def original_augmentation(size: int) -> transforms.Compose:
    """facebookresearch/moco's aug+ (MoCo v2), float tensors normalised per image in the worker."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _pipeline(variant: str, p: dict, device: torch.device):
    paths = find_unlabeled_images(p["data"])
    position = iter(range(10**9))
    if variant == "ours":
        dataset = UnlabeledImages(paths, TwoCropsTransform(moco_augmentation(p["size"])))

        def step() -> int:
            dataset[0, next(position) % len(paths)]
            return 1
    else:
        two_crops = TwoCropsTransform(original_augmentation(p["size"]))

        def step() -> int:
            two_crops(load_rgb(paths[next(position) % len(paths)]))
            return 1
    step.repeat = 16  # images per timed step
    return step


class _OriginalImages(torch.utils.data.Dataset):
    """facebookresearch/moco's training set: ImageFolder's PIL loader, aug+ to normalised floats per view."""

    def __init__(self, paths: list, size: int):
        self.paths, self.transform = paths, TwoCropsTransform(original_augmentation(size))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(pil_loader(self.paths[i])), 0


def _epoch(variant: str, p: dict, device: torch.device):
    """A pretraining epoch over the first ``images`` PNGs, loader and model together. "ours": moco.train's loader
    and training loop at its defaults (split BN, the device's precision). "original": facebookresearch/moco's loop
    (torch's DataLoader, its workers started every epoch, float views; fp32 and plain BN; the loss and top-1/top-5
    read to the host every step)."""
    paths = find_unlabeled_images(p["data"])[:p["images"]]
    args, model, amp_dtype, memory_format = _moco_model(variant, p, device, "--image-size", str(p["size"]), "-b",
                                                        str(p["batch"]), "--aug-plus", "-j", str(p["workers"]), "-p",
                                                        "0", uint8_views=variant == "ours")
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    epochs = iter(range(10**9))
    if variant == "ours":
        loader, sampler = moco_train.build_loader(args, paths, 0, 1, device)
        unreadable_files = UnreadableFiles(args.max_unreadable, device)
        watch = failures.LossWatch(device, 4, moco_train.describe_logits)

        def step() -> int:
            epoch = next(epochs)
            sampler.set_epoch(epoch)
            moco_train.train_one_epoch(model, loader, optimizer, None, amp_dtype, epoch, args, device, 1,
                                       unreadable_files, watch)
            return len(loader) * args.batch_size
    else:
        loader = torch.utils.data.DataLoader(_OriginalImages(paths, p["size"]), batch_size=args.batch_size,
                                             shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda",
                                             drop_last=True)

        def step() -> int:
            seen = 0
            for (im_q, im_k), _ in loader:
                logits, labels = model(im_q.to(device), im_k.to(device))
                loss = F.cross_entropy(logits, labels)
                top5 = logits.topk(5, dim=1).indices == labels[:, None]
                loss.item(), top5[:, 0].float().mean().item(), top5.any(1).float().mean().item()  # its meters
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += labels.shape[0]
            return seen
    return step


def _detection(variant: str, p: dict, device: torch.device):
    size = p["size"]
    if variant == "original":  # torchvision's reference without weights: BatchNorm trained, every stage, one size
        if p["arch"] == "resnet50":
            model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                           min_size=size, max_size=size * 5 // 3)
        else:  # the same layout around a smaller ResNet
            model = build_detector(DetectorConfig(arch=p["arch"], num_classes=91, norm="sync", trainable_layers=5,
                                                  min_size=size, max_size=size * 5 // 3, rois_per_image=p["rois"],
                                                  fpn_channels=256))
        model.roi_heads.fg_bg_sampler.batch_size_per_image = p["rois"]
        amp_dtype, memory_format = None, torch.contiguous_format
    else:
        protocol = PROTOCOLS[DEFAULT_PROTOCOL]
        model = build_detector(DetectorConfig(arch=p["arch"], norm=protocol.norm, num_classes=91,
                                              trainable_layers=protocol.trainable_layers, min_size=size,
                                              max_size=size * 5 // 3, rois_per_image=p["rois"], fpn_channels=256,
                                              train_min_sizes=multiscale_sizes(size) if protocol.multiscale else ()))
        amp_dtype = autocast_dtype(device, inference=not p["train"])
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # demo.train's
    model = model.to(device, memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size * 4 // 3, generator=generator, device="cpu").to(device) for _ in range(2)]
    targets = []
    for _ in images:
        xy = torch.rand(6, 2, generator=generator) * size * 0.7
        wh = 16 + torch.rand(6, 2, generator=generator) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 91, (6,), generator=generator).to(device)})
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.001, momentum=0.9)
    model.train(p["train"])
    if variant == "ours" and not p["train"]:  # as demo.evaluate, demo.predict and validation run it
        model = for_inference(model)

    def step() -> int:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if p["train"]:
                loss = sum(model(images, targets).values())
            else:
                with torch.no_grad():
                    model(images)
        if p["train"]:
            optimizer_step(loss, optimizer, None)
        return len(images)

    return step


def synthetic_coco(images: int, classes: int, detections: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth and a detector-like result: jittered true boxes (some with a wrong class) plus clutter."""
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i + 1, "width": 1000, "height": 750} for i in range(images)],
          "categories": [{"id": c + 1, "name": f"class {c + 1}"} for c in range(classes)], "annotations": []}
    results = []
    for image in gt["images"]:
        for _ in range(int(rng.integers(1, 8))):
            x, y, w, h = *rng.uniform(0, 700, 2), *rng.uniform(8, 300, 2)
            category = int(rng.integers(1, classes + 1))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image["id"], "iscrowd": 0,
                                      "category_id": category, "bbox": [x, y, w, h], "area": w * h})
        truths = [a for a in gt["annotations"][-8:] if a["image_id"] == image["id"]]
        for d in range(detections):
            if d < 3 * len(truths):
                a = truths[d % len(truths)]
                box = np.array(a["bbox"]) + rng.normal(0, 0.1, 4) * np.array(a["bbox"][2:] * 2)
                category = a["category_id"] if rng.random() < 0.8 else int(rng.integers(1, classes + 1))
            else:
                box, category = np.array([*rng.uniform(0, 800, 2), *rng.uniform(4, 200, 2)]), int(
                    rng.integers(1, classes + 1))
            box[2:] = np.maximum(box[2:], 1)
            results.append({"image_id": image["id"], "category_id": category,
                            "bbox": [round(float(v), 2) for v in box], "score": round(float(rng.random()), 5)})
    return gt, results


def _coco(variant: str, p: dict, device: torch.device):
    gt, results = synthetic_coco(p["images"], p["classes"], p["detections"])

    def step() -> int:
        step.stats = coco_eval.evaluate(copy.deepcopy(gt), copy.deepcopy(results), variant).stats
        return 1

    return step


BUILDERS = {"moco": _moco_step, "compile": _moco_step, "pipeline": _pipeline, "epoch": _epoch,
            "detection": _detection, "coco": _coco}


def _count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul large enough to be compute-bound, in ``dtype``."""
    n = 2048 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


# ---- one process per variant

def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _variant_process(conn, row: Row, variant: str, device_name: str) -> None:
    device = torch.device(device_name)
    torch.manual_seed(0)
    step = BUILDERS[row.kind](variant, row.params, device)
    repeat = getattr(step, "repeat", 1)
    start = time.perf_counter()
    info = {"flops": step.flops() if hasattr(step, "flops") else None}  # also the warm-up
    if info["flops"] is None and row.kind != "coco":  # an evaluation has nothing to warm up, and takes minutes
        step()
    if row.kind != "coco":
        info["warmup_s"] = time.perf_counter() - start  # a first step: torch.compile's compilation shows here
    info["dtype"] = str(getattr(step, "dtype", "")).replace("torch.", "")
    conn.send(info)
    while conn.recv():
        start = time.perf_counter()
        items = sum(step() for _ in range(repeat))
        if device.type == "cuda":
            torch.cuda.synchronize()
        conn.send((items, time.perf_counter() - start, getattr(step, "stats", None)))
    conn.send(_peak_memory(device))


def _receive(process, conn, what: str):
    """The variant process's next message; its death (its traceback is on stderr) is an error, not a hang."""
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"bench: the process of {what} died (exit code {process.exitcode}); see its traceback "
                               f"above")
    return conn.recv()


def measure(row: Row, rounds: int, device: torch.device) -> dict:
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for variant in row.variants:
            parent, child = context.Pipe()
            # Not daemonic: a variant may start data-loading workers of its own.
            process = context.Process(target=_variant_process, args=(child, row, variant, str(device)))
            process.start()
            workers[variant] = (process, parent, _receive(process, parent, f"{row.name}, {variant}"))
        samples = {v: [] for v in row.variants}
        stats = {}
        for _ in range(rounds):  # interleaved: a slow spell of the machine falls on every variant alike
            for variant, (process, conn, _) in workers.items():
                conn.send(True)
                items, seconds, stats[variant] = _receive(process, conn, f"{row.name}, {variant}")
                samples[variant].append(items / seconds if row.unit == "img/s" else seconds)
        infos = {}
        for variant, (process, conn, info) in workers.items():
            conn.send(False)
            infos[variant] = {**info, "peak_memory_bytes": _receive(process, conn, f"{row.name}, {variant}")}
            process.join()
    finally:
        for process, _, _ in workers.values():
            if process.is_alive():
                process.terminate()
    return summarise(row, samples, infos, stats)


def summarise(row: Row, samples: dict[str, list[float]], infos: dict[str, dict], stats: dict[str, dict]) -> dict:
    """Medians, and ratios against the first variant's median (> 1: better than the baseline)."""
    base = statistics.median(samples[row.variants[0]])
    out = {"row": row.name, "unit": row.unit, "params": row.params, "variants": {}}
    for variant in row.variants:
        median = statistics.median(samples[variant])
        out["variants"][variant] = {"median": median, "samples": samples[variant], **infos[variant],
                                    "ratio": median / base if row.unit == "img/s" else base / median}
    if row.kind == "coco":  # the fast path must score exactly what the reference scores
        values = np.array([[stats[v][n] for n in coco_eval.STAT_NAMES] for v in row.variants])
        out["stats_max_difference"] = float(np.abs(values - values[0]).max())
    return out


def peak_shares(result: dict, peaks: dict[str, float]) -> None:
    """Adds each MoCo variant's share of the matmul peak in its own dtype and in bf16."""
    for v in result["variants"].values():
        if v.get("flops"):
            flops_per_s = v["flops"] * v["median"] / result["params"]["batch"]
            v["peak_share"] = flops_per_s / peaks[v["dtype"]]
            v["bf16_peak_share"] = flops_per_s / peaks["bfloat16"]


def table(results: list[dict]) -> str:
    lines = [f"{'row':<52} {'variant':<20} {'median':>14} {'ratio':>5} {'peak mem':>9} {'of peak (bf16)':>15} "
             f"{'warm-up':>8}"]
    for r in results:
        for i, (name, v) in enumerate(r["variants"].items()):
            share = f"{100 * v['peak_share']:.0f}% ({100 * v['bf16_peak_share']:.0f}%)" if "peak_share" in v else ""
            warmup = f"{v['warmup_s']:.1f}s" if "warmup_s" in v else ""
            lines.append(f"{r['row'] if i == 0 else '':<52} {name:<20} {v['median']:>8.3g} {r['unit']:<5}"
                         f"{v['ratio']:>5.2f}x {v['peak_memory_bytes'] / 2**30:>7.2f}G {share:>15} {warmup:>8}")
        if r.get("stats_max_difference") is not None:
            lines.append(f"{'':<52} stats: largest difference {r['stats_max_difference']:.1g}")
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cpu":
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"device": str(device), "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/bench")
    p.add_argument("--data", default="data/tiny/train", help="unlabeled PNGs for the input-pipeline row")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant, alternating")
    p.add_argument("--quick", action="store_true", help="every row shrunk to seconds (for the tests)")
    p.add_argument("--only", nargs="+", choices=sorted(BUILDERS), help="these kinds of row alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_parser().parse_args(argv)
    setup_logging(0)
    device = torch.device(args.device)
    info = machine(device)
    log.info("bench on %s (%s), %d threads, torch %s", info["device"], info["name"], info["threads"], info["torch"])
    peaks = {str(d).replace("torch.", ""): matmul_peak(d, device, 0.5 if args.quick else 2.0)
             for d in (torch.float32, torch.bfloat16) + ((torch.float16,) if device.type == "cuda" else ())}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    chosen = [r for r in rows(args.quick, Path(args.data)) if (r.kind in args.only if args.only else not r.on_request)]
    for row in chosen:
        rounds = 1 if row.kind == "coco" and not args.quick else args.rounds  # pycocotools takes minutes there
        result = measure(row, rounds, device)
        peak_shares(result, peaks)
        log.info("%s: %s", row.name, ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in result["variants"].items()))
        results.append(result)
        # Rewritten after every row: a bench stopped half-way keeps the rows it measured.
        (out / "bench.json").write_text(json.dumps({"machine": info, "matmul_peak_flops": peaks, "rows": results},
                                                   indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
