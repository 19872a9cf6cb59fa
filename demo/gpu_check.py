"""`make gpu-check`: everything this project runs on a GPU, checked in a few minutes on one, as is.

    python -m demo.gpu_check [--device cuda|cpu] [--output-dir runs/gpu-check] [--data data/tiny]
                             [--precision auto|bf16|fp16]

Rows, each with its status (pass, fail, skipped), its figures and their tolerance:
- the preflight, ``moco.runtime.doctor --exercise`` (every visible GPU's fp16/bf16 kernels against fp32);
- moco.train's step on the GPU against the CPU from the same weights, batch and key shuffle: in fp32 (IEEE, no
  TF32) and in the training precision (``--precision``, moco.runtime.precision's choice by default), the CPU in fp32
  (see demo.step_check for the figures and tolerances);
- the host's waits for the GPU in pretraining steps of moco.train's loop, fp32 and the training precision, counted
  under torch's sync debug mode after a few warm-up steps (see demo.host_syncs);
- r1 fine-tuning (demo.train) for a few steps from that pretraining, its checkpoint, and demo.evaluate of it on the
  tiny set's validation split;
- ``demo.bench --only moco detection`` (figures reported, not judged);
- with two GPUs or more, a 2-rank NCCL step against one process over the whole batch (demo.step_check).
The tiny dataset (``--data``, moco.course.tinyset) is generated when missing. The table is printed and written, with
every figure, to ``<output-dir>/gpu_check.json``. Exit status 0 when no row failed, 1 when one did, 2 without
CUDA.

``--device cpu`` rehearses the same script on the CPU: the comparisons run CPU against CPU through the same code,
the two ranks over gloo, the other rows smaller (fewer steps, r1's own validation split for demo.evaluate, the
bench's quick MoCo row alone); the rows that only mean something on a GPU say "skipped: needs CUDA" (their code
still runs where it can).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moco import train as moco_train
from moco.course.tinyset import MARKER, generate
from moco.runtime import checkpoint, failures
from moco.runtime.devices import configure_backends, cuda_problem
from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.metrics import FILE, read_metrics
from moco.runtime.precision import MODES, autocast_dtype

from . import bench, host_syncs, step_check
from .coco_eval import STAT_NAMES

log = get_logger("demo.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
EXIT_NO_CUDA = 2


@dataclass
class Row:
    name: str
    status: str  # "pass", "fail" or "skipped: why"
    measured: dict = field(default_factory=dict)
    tolerance: dict | str = ""
    detail: str = ""
    seconds: float = 0.0
    shown: str = ""  # the table's figures, when not all of ``measured``


@dataclass(frozen=True)
class Sizes:
    """What differs between a GPU and the CPU rehearsal: how much work, never which code."""
    sync_steps: int
    sync_warmup: int
    finetune_images: tuple[int, int]  # training, validation: r1's few steps at batch 4, and its validation
    evaluate_tiny_set: bool  # demo.evaluate on the tiny set's validation split, else on r1's own (smaller) one
    workers: int
    bench_kinds: tuple[str, ...]
    bench_flags: tuple[str, ...]
    timeout_s: int  # for each subprocess


CUDA_SIZES = Sizes(50, 5, (32, 8), True, 4, ("moco", "detection"), ("--rounds", "3"), 360)
CPU_SIZES = Sizes(6, 2, (8, 4), False, 1, ("moco",), ("--quick", "--rounds", "1"), 300)
FINETUNE_FLAGS = ("--epochs", "1", "-b", "4", "--min-size", "224", "--max-size", "320", "--rois-per-image", "64",
                  "--fpn-channels", "128", "-p", "1")


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _python(module: str, *argv: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -m module`` from here (relative paths stay as the user gave them), this repository importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    """A failed subprocess's own last words: its 'error:' line, else its last line."""
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return f"exit status {proc.returncode}: {(errors or lines or ['no output'])[-1].strip()[:300]}"


class Check:
    def __init__(self, args: argparse.Namespace):
        self.device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.sizes = CUDA_SIZES if self.cuda else CPU_SIZES
        self.out = Path(args.output_dir)
        self.data = Path(args.data)
        self.amp_dtype = autocast_dtype(self.device, args.precision)
        self.rows: list[Row] = []
        self.backbone: Path | None = None
        self.r1_checkpoint: Path | None = None

    def run(self, name: str, body: Callable[[], Row]) -> Row:
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            row = body()
        except Exception as exc:  # a row that breaks is a failed row; the others still run
            log.error("%s: %s", name, traceback.format_exc())
            row = Row(name, "fail", detail=f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
        row.name, row.seconds = name, time.perf_counter() - start
        log.info("%s: %s (%.1f s)", name, row.status, row.seconds)
        self.rows.append(row)
        return row

    # ---- the rows

    def doctor(self) -> Row:
        proc = _python("moco.runtime.doctor", "--exercise", "--device", self.device.type, timeout=self.sizes.timeout_s)
        exercised = [line for line in proc.stdout.splitlines() if line.startswith("doctor: exercise:")]
        measured = {"exit_status": proc.returncode, "kernels_exercised": len(exercised), "report": proc.stdout}
        shown = f"{len(exercised)} kernels exercised, exit status {proc.returncode}"
        if proc.returncode:
            return Row("", "fail", measured, "exit status 0", proc.stderr.strip().splitlines()[-1] if proc.stderr
                       else _last_error(proc), shown=shown)
        return Row("", "pass", measured, "finite, within moco.runtime.exercise.TOLERANCE of fp32", shown=shown)

    @functools.cached_property
    def moco_case(self) -> tuple:
        """The comparisons' MoCo: its arguments, the first batch of the data, initial weights, the CPU's step."""
        args = step_check.step_args(self.data / "train", 32, 8)
        views = step_check.first_batch(args)
        state = step_check.initial_state(args)
        return args, views, state, step_check.cpu_reference(args, state, views)

    def step(self, amp_dtype: torch.dtype | None) -> Row:
        args, views, state, reference = self.moco_case
        if self.cuda and amp_dtype is None:
            with step_check.ieee_fp32(self.device):
                result = step_check.compare_devices(args, state, views, self.device, None, reference)
        else:
            configure_backends(self.device, fixed_shapes=True)  # the trainer's TF32 and autotuner
            result = step_check.compare_devices(args, state, views, self.device, amp_dtype, reference)
        return Row("", "fail" if result["beyond"] else "pass", result["measured"], result["tolerance"],
                   f"beyond tolerance: {', '.join(result['beyond'])}" if result["beyond"] else
                   f"loss {result['loss']:.5f}, CPU {result['reference_loss']:.5f}"
                   + (f"; GradScaler at {result['fp16_scale']:g}" if "fp16_scale" in result else ""))

    def syncs(self, amp_dtype: torch.dtype | None, keep_backbone: bool) -> Row:
        if not self.cuda and not keep_backbone:
            return Row("", "skipped: needs CUDA (the rehearsal runs the training-precision row's steps)")
        args = step_check.step_args(self.data / "train", 32, 8)
        args.workers = self.sizes.workers
        steps, warmup = self.sizes.sync_steps, self.sizes.sync_warmup
        start = time.perf_counter()
        model, stats, counter = host_syncs.pretraining_steps(args, self.device, amp_dtype, steps)
        seconds = time.perf_counter() - start
        figures = host_syncs.judge(counter.syncs, steps, warmup, failures.LossWatch.EVERY,
                                   scaler_allowed=amp_dtype == torch.float16)
        figures.update(loss=stats["loss"], images_per_s=steps * args.batch_size / seconds)
        if keep_backbone:
            self.backbone = self.out / "backbone.pth.tar"
            checkpoint.save_atomic({"epoch": 1, "arch": args.arch, "args": {**vars(args), "epochs": 1},
                                    "state_dict": moco_train.state_dict_with_prefix(model)}, self.backbone)
        tolerance = (f"after {warmup} warm-up steps: none, but one at LossWatch's checks (every "
                     f"{failures.LossWatch.EVERY} steps)" + ("; the GradScaler's reads aside" if amp_dtype ==
                                                             torch.float16 else ""))
        if not math.isfinite(stats["loss"]):
            return Row("", "fail", figures, tolerance, f"the loss is {stats['loss']}")
        if not self.cuda:
            return Row("", "skipped: needs CUDA", figures, tolerance,
                       f"{steps} steps ran on the CPU, where nothing synchronises",
                       shown=f"{figures['total']} syncs, {figures['images_per_s']:.3g} img/s")
        top = "; ".join(f"{o['count']}x {o['where']} ({o['call']})" for o in figures["origins"][:3])
        shown = (f"steady {figures['steady']} in {steps - warmup} steps ({figures['steady_at_check_steps']} at "
                 f"checks), warm-up {figures['warmup']}, outside steps {figures['outside_steps']}")
        if figures["offending_steps"]:
            return Row("", "fail", figures, tolerance, f"steps {figures['offending_steps'][:5]} waited: {top}",
                       shown=shown)
        return Row("", "pass", figures, tolerance, top or "no synchronisation at all", shown=shown)

    @property
    def finetune_data(self) -> Path:
        return self.out / "finetune-data"

    def finetune(self) -> Row:
        small = self.finetune_data
        generate(small, unlabeled=0, train=self.sizes.finetune_images[0], val=self.sizes.finetune_images[1],
                 workers=1)
        runs = self.out / "fpn"
        shutil.rmtree(runs, ignore_errors=True)  # a stage found complete would not train again
        bp = ("--bp", str(self.backbone)) if self.backbone else ()
        proc = _python("demo.train", "--stage", "r1", *bp, "--dataset-root", str(small / "labeled"), "--output-dir",
                       str(runs), "--device", self.device.type, "-j", str(self.sizes.workers), *FINETUNE_FLAGS,
                       timeout=self.sizes.timeout_s)
        tolerance = "exit status 0; a checkpoint of stage r1 at epoch 1; finite losses"
        if proc.returncode:
            return Row("", "fail", {"exit_status": proc.returncode}, tolerance, _last_error(proc))
        path = runs / "r1" / checkpoint.LAST
        ckpt = checkpoint.load(path)
        record = read_metrics(runs / "r1" / FILE)[-1]
        losses = {k: v for k, v in record.items() if k.startswith("loss")}
        measured = {"stage": ckpt["stage"], "epoch": ckpt["epoch"], **losses,
                    "images_per_s": record.get("images_per_s"), "val_AP": (ckpt.get("val") or {}).get("AP"),
                    "backbone": str(self.backbone) if self.backbone else "random"}
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if ckpt["stage"] != "r1" or ckpt["epoch"] != 1 or bad or not losses:
            return Row("", "fail", measured, tolerance, f"not finite: {bad}" if bad else "unexpected checkpoint")
        self.r1_checkpoint = path
        return Row("", "pass", measured, tolerance, str(path))

    def evaluate(self) -> Row:
        if self.r1_checkpoint is None:
            return Row("", "fail", detail="no r1 checkpoint to evaluate (see the row above)")
        root = self.data / "labeled" if self.sizes.evaluate_tiny_set else self.finetune_data / "labeled"
        out = self.out / "evaluate"
        proc = _python("demo.evaluate", "--checkpoint-path", str(self.r1_checkpoint), "--dataset-root", str(root),
                       "--dataset-split", "validation", "--output-dir", str(out), "--device", self.device.type,
                       "-j", str(self.sizes.workers), timeout=self.sizes.timeout_s)
        tolerance = "exit status 0; every validation image scored; the 12 COCO stats finite"
        if proc.returncode:
            return Row("", "fail", {"exit_status": proc.returncode}, tolerance, _last_error(proc))
        metrics = json.loads((out / "metrics_validation.json").read_text())
        expected = len(list((root / "validation" / "images").iterdir()))
        stats = {name: metrics["stats"].get(name) for name in STAT_NAMES}
        measured = {"images": metrics["images"], "AP": stats["AP"], "AP50": stats["AP50"]}
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats.values())
        if metrics["images"] != expected or not finite:
            return Row("", "fail", measured, tolerance, f"{metrics['images']} of {expected} images; stats {stats}")
        return Row("", "pass", measured, tolerance, f"{root}/validation, {out}")

    def bench(self) -> Row:
        out = self.out / "bench"
        proc = _python("demo.bench", "--only", *self.sizes.bench_kinds, "--device", str(self.device), "--output-dir",
                       str(out), "--data", str(self.data / "train"), *self.sizes.bench_flags,
                       timeout=self.sizes.timeout_s)
        tolerance = "exit status 0; every variant measured (figures reported, not judged)"
        if proc.returncode:
            return Row("", "fail", {"exit_status": proc.returncode}, tolerance, _last_error(proc))
        results = json.loads((out / "bench.json").read_text())["rows"]
        measured = {r["row"]: {name: f"{v['median']:.3g} {r['unit']} ({v['ratio']:.2f}x)"
                               for name, v in r["variants"].items()} for r in results}
        medians = [v["median"] for r in results for v in r["variants"].values()]
        shown = "ours against the baseline: " + ", ".join(
            f"{v['ratio']:.2f}x" for r in results for name, v in r["variants"].items() if name == "ours")
        expected = [r.name for r in bench.rows("--quick" in self.sizes.bench_flags, self.data / "train")
                    if r.kind in self.sizes.bench_kinds and not r.on_request]
        missing = sorted(set(expected) - {r["row"] for r in results})
        if missing or not all(math.isfinite(m) and m > 0 for m in medians):
            return Row("", "fail", measured, tolerance, f"missing rows {missing}" if missing else f"medians {medians}",
                       shown=shown)
        return Row("", "pass", measured, tolerance, str(out / "bench.json"), shown=shown)

    def ranks(self) -> Row:
        if self.cuda and torch.cuda.device_count() < 2:
            return Row("", "skipped: needs 2 GPUs")
        args, views, state, _ = self.moco_case
        result = step_check.compare_ranks(args, state, views, self.device.type, timeout_s=self.sizes.timeout_s)
        return Row("", "fail" if result["beyond"] else "pass", result["measured"], result["tolerance"],
                   f"beyond tolerance: {', '.join(result['beyond'])}" if result["beyond"] else
                   f"rank losses {', '.join(f'{v:.5f}' for v in result['rank_losses'])}; one process "
                   f"{result['loss']:.5f}")

    def all(self) -> list[Row]:
        where = "CUDA" if self.cuda else "CPU"
        precision = dtype_name(self.amp_dtype)
        self.run("doctor --exercise", self.doctor)
        self.run(f"MoCo step, fp32, {where} vs CPU", lambda: self.step(None))
        if self.amp_dtype is None:
            self.rows.append(Row(f"MoCo step, training precision, {where} vs CPU",
                                 "skipped: the training precision is fp32 here (the row above)"))
        else:
            self.run(f"MoCo step, {precision}, {where} vs CPU",
                     lambda: self.step(self.amp_dtype))
        steps = self.sizes.sync_steps
        if self.amp_dtype is not None:
            self.run(f"host syncs, {steps} steps, fp32", lambda: self.syncs(None, keep_backbone=False))
        self.run(f"host syncs, {steps} steps, {precision}", lambda: self.syncs(self.amp_dtype, keep_backbone=True))
        self.run("r1 fine-tuning, a few steps", self.finetune)
        self.run("demo.evaluate, validation split", self.evaluate)
        self.run(f"demo.bench --only {' '.join(self.sizes.bench_kinds)}", self.bench)
        self.run(f"2 ranks ({'NCCL' if self.cuda else 'gloo'}) vs 1 process", self.ranks)
        return self.rows


def _figures(values) -> str:
    if not isinstance(values, dict):
        return str(values)
    shown = []
    for name, value in values.items():
        if isinstance(value, float):
            shown.append(f"{name} {value:.3g}")
        elif isinstance(value, (int, str)) and len(str(value)) <= 40:
            shown.append(f"{name} {value}")
    return ", ".join(shown)


def table(rows: list[Row]) -> str:
    """One line a row (check, status, figures, tolerance), and under it why it was skipped or failed, or where."""
    lines = [f"{'check':<38} {'status':<7} {'measured':<72} tolerance"]
    for row in rows:
        status, _, why = row.status.partition(": ")
        shown = row.shown or _figures(row.measured)
        lines.append(f"{row.name:<38} {status:<7} {shown[:72]:<72} {_figures(row.tolerance)}".rstrip())
        for note in filter(None, (why, row.detail)):
            lines.append(f"{'':<38} {note}"[:240])
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: the check; cpu: its rehearsal, the same script on the CPU")
    p.add_argument("--output-dir", default="runs/gpu-check")
    p.add_argument("--data", default="data/tiny", help="the tiny dataset (moco.course.tinyset), generated when missing")
    p.add_argument("--precision", default="auto", choices=[m for m in MODES if m != "off"],
                   help="the training precision compared with fp32 (auto: moco.train's choice for the device)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging(0)
    if args.device == "cuda" and (problem := cuda_problem()) is not None:
        print(f"gpu-check: error: no usable GPU here ({problem}); `make gpu-check DEVICE=cpu` rehearses the check on "
              f"the CPU", file=sys.stderr)
        return EXIT_NO_CUDA
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / MARKER).is_file():  # any complete tiny set will do, whatever its size
        generate(args.data, workers=max(1, min(8, os.cpu_count() or 1)))
    check = Check(args)
    rows = check.all()
    failed = [row.name for row in rows if row.status == "fail"]
    summary = {"device": str(check.device), "device_name": torch.cuda.get_device_name(check.device) if check.cuda
               else "cpu", "gpus": torch.cuda.device_count() if check.cuda else 0, "torch": torch.__version__,
               "precision": dtype_name(check.amp_dtype), "date": time.strftime("%Y-%m-%d %H:%M"),
               "seconds": time.perf_counter() - start, "passed": not failed, "rows": [asdict(r) for r in rows]}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    print(table(rows))
    log.info("%s in %.0f s; figures in %s", f"{len(failed)} row(s) failed: {', '.join(failed)}" if failed else
             "no row failed", summary["seconds"], out / "gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
