"""Does pretraining help? MoCo-initialised vs randomly initialised fine-tuning, over several seeds.

    python -m demo.compare --bp MOCO_CHECKPOINT --dataset-root ROOT --output-dir runs/compare \
        [--seeds 0 1 2] [--epochs 3 4 5] [--] [demo.train flags shared by every run]

For each seed, the stages r1 -> r2 -> r3 run twice under the same protocol and flags, once from ``--bp`` and
once from a random backbone of the same architecture, into ``<output-dir>/<init>-seed<N>/``. Each stage is a
``python -m demo.train`` process, so an interrupted comparison resumes where it stopped when run again. Each run's
score is its r3 validation (the same numbers as ``demo.evaluate`` on that split). The summary gives mean ± sample
standard deviation of AP, AP50 and AP75 for both, the difference of the means, and the kNN probe (moco.probe) of
both backbones before fine-tuning: the MoCo checkpoint's, and the random ones each seed's r1 started from. It is
printed and written to ``<output-dir>/compare.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torchvision.models as tv_models

from moco.probe import KnnProbe
from moco.runtime import checkpoint
from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.metrics import FILE, read_metrics

from .model import read_backbone

log = get_logger("demo.compare")

INITS = ("moco", "random")
METRICS = ("AP", "AP50", "AP75")
KNN = ("knn_top1", "knn_top1_own_bn")  # moco.probe: BatchNorm recalibrated on the probe's crops, and as held


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bp", required=True, help="the pretrained backbone (a MoCo checkpoint)")
    p.add_argument("--dataset-root", required=True)
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, nargs=3, default=None, metavar=("R1", "R2", "R3"),
                   help="the epochs at which r1, r2 and r3 end; default: the recipe's")
    p.add_argument("--probe-size", type=int, default=None,
                   help="kNN crop size; default: the pretraining's --image-size, as its own probe")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="flags for every demo.train run, after --")
    return p


def run_dir(output_dir: Path, init: str, seed: int) -> Path:
    return output_dir / f"{init}-seed{seed}"


def fine_tune(args: argparse.Namespace, arch: str, init: str, seed: int) -> dict:
    """r1 -> r2 -> r3 in their own processes (each resumes itself); returns r3's last validation."""
    out = run_dir(Path(args.output_dir), init, seed)
    shared = ["--dataset-root", args.dataset_root, "--output-dir", str(out), "--seed", str(seed),
              *[a for a in args.train_args if a != "--"]]
    for i, stage in enumerate(("r1", "r2", "r3")):
        argv = [sys.executable, "-m", "demo.train", "--stage", stage, *shared]
        if args.epochs:
            argv += ["--epochs", str(args.epochs[i])]
        if stage == "r1":
            argv += ["--bp", args.bp] if init == "moco" else ["-a", arch]
        log.info("%s seed %d: stage %s", init, seed, stage)
        subprocess.run(argv, check=True)
    return read_metrics(out / "r3" / FILE)[-1]["val"]


def random_backbone(arch: str, seed: int) -> torch.nn.Module:
    """The body demo.train starts from without --bp: the first weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return tv_models.get_model(arch, weights=None)


def pretrained_backbone(path: str) -> tuple[str, torch.nn.Module]:
    arch, weights = read_backbone(path)
    model = tv_models.get_model(arch, weights=None)
    missing, _ = model.load_state_dict(weights, strict=False)
    if any(not k.startswith("fc.") for k in missing):
        raise ValueError(f"{path}: backbone weights missing {missing[:3]}")
    return arch, model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(scores: dict[str, list[dict]], knn: dict[str, list[dict]]) -> dict:
    """Mean and sample std per init of the runs' scores and the backbones' kNN; the difference of the means."""
    summary = {init: {m: mean_std([r[m] for r in scores[init] + knn[init] if m in r]) for m in (*METRICS, *KNN)}
               for init in INITS}
    summary["difference"] = {m: summary["moco"][m][0] - summary["random"][m][0] for m in (*METRICS, *KNN)}
    return summary


def table(summary: dict, seeds: list[int]) -> str:
    columns = (*METRICS, *KNN)
    lines = [f"{'init':<8}" + "".join(f"{m:>18}" for m in columns) + f"   seeds {seeds}"]
    for init in INITS:
        lines.append(f"{init:<8}" + "".join(f"{mean:>11.3f} ± {std:.3f}" for mean, std in
                                            (summary[init][m] for m in columns)))
    lines.append(f"{'moco-rnd':<8}" + "".join(f"{summary['difference'][m]:>+18.3f}" for m in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)
    setup_logging(0)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arch, pretrained = pretrained_backbone(args.bp)
    probe_size = args.probe_size or (checkpoint.load(args.bp, mmap=True).get("args") or {}).get("image_size", 224)
    probe = KnnProbe(args.dataset_root, probe_size, torch.device("cpu"))
    knn = {"moco": [probe(pretrained)] * len(args.seeds),  # one backbone for every seed
           "random": [probe(random_backbone(arch, seed)) for seed in args.seeds]}
    scores: dict[str, list[dict]] = {init: [] for init in INITS}
    for seed in args.seeds:
        for init in INITS:
            scores[init].append(fine_tune(args, arch, init, seed))
    summary = summarise(scores, knn)
    result = {"seeds": args.seeds, "arch": arch, "bp": args.bp, "train_args": args.train_args, "epochs": args.epochs,
              "runs": scores, "knn": knn, "summary": summary}
    (output_dir / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(summary, args.seeds))
    return result


if __name__ == "__main__":
    main()
