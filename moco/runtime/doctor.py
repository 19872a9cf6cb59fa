"""Preflight: what this process would run on, and whether it can, before any data is read or GPU hour is spent.

    python -m moco.runtime.doctor [--device auto|cuda|cpu] [--archs "sm_70 sm_80 sm_90"] [--build-only] [--exercise]

Prints the torch, torchvision, CUDA, cuDNN and NCCL versions of the build and the GPU architectures it carries,
the driver (from nvidia-smi, when there is one), every visible GPU with its capability, memory and whether the
build has kernels for it, the GPUs the launcher allocated, the launch (torchrun / srun / single) with rank and
world size, and the device a trainer would take. Exits 1 with one sentence when the build lacks an architecture
the site needs (``--archs``, default ``$CUDA_ARCHS``), or when GPUs were allocated (or ``--device cuda`` asked for)
and CUDA cannot use them. ``--build-only`` checks the build alone (``make venv`` runs it after installing).
``--exercise`` then runs real work on every visible GPU (on the CPU without one; see moco.runtime.exercise) and exits 1
with one sentence naming the host and the GPU whose results are not finite or not those of fp32.
Every Slurm job runs it first; ``make doctor`` runs it here.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

import torch

from .devices import (
    DeviceError,
    add_device_argument,
    allocated_gpus,
    arch_covered,
    compiled_archs,
    parse_arch,
    select_device,
    sm_name,
)
from .distributed import detect_launch
from .exercise import ExerciseFailed, exercise


def missing_archs(required: list[str], compiled: list[str]) -> list[str]:
    """The required architectures (``sm_XY``) that a build with ``compiled`` cannot run on."""
    missing = []
    for arch in required:
        parsed = parse_arch(arch)
        if parsed is None or parsed[0] != "sm" or parsed[3]:
            raise ValueError(f"CUDA_ARCHS entry {arch!r}: write architectures as sm_XY, e.g. sm_70 sm_80 sm_90")
        if not arch_covered(parsed[1:3], compiled):
            missing.append(arch)
    return missing


def versions() -> list[str]:
    import torchvision

    nccl = "none"
    if torch.backends.cuda.is_built() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # a build without NCCL
            pass
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}",
            f"CUDA build {torch.version.cuda or 'none'}, cuDNN {cudnn or 'none'}, NCCL {nccl}"]


def driver() -> str:
    """The NVIDIA driver and the newest CUDA it supports, as nvidia-smi prints them."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found (no NVIDIA driver on PATH)"
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer within 30 s"
    found = dict(re.findall(r"(Driver Version|CUDA Version): *([\w.]+)", out.stdout))
    if out.returncode or not found:
        return f"nvidia-smi failed: {(out.stderr or out.stdout).strip().splitlines()[:1]}"
    return f"{found.get('Driver Version', '?')} (supports CUDA {found.get('CUDA Version', '?')})"


def gpus(compiled: list[str]) -> list[str]:
    if not torch.cuda.is_available():
        return []
    lines = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        covered = "kernels in this build" if arch_covered(capability, compiled) else "NO KERNELS IN THIS BUILD"
        lines.append(f"GPU {index}: {props.name}, {sm_name(capability)}, {props.total_memory / 2**30:.1f} GiB, "
                     f"{covered}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(p)
    p.add_argument("--archs", default=os.environ.get("CUDA_ARCHS", ""),
                   help="architectures the build must carry (default: $CUDA_ARCHS, set by the site config)")
    p.add_argument("--build-only", action="store_true", help="check the build only, not GPUs or launch")
    p.add_argument("--exercise", action="store_true",
                   help="also run about a second of fp16/bf16 matmuls and convolutions on every visible GPU (the CPU "
                        "without one), checked against fp32")
    args = p.parse_args(argv)
    if args.build_only and args.exercise:
        p.error("--exercise needs the GPUs that --build-only leaves alone")

    compiled = compiled_archs()
    required = args.archs.split()
    report = versions() + [f"kernels: {' '.join(compiled) or 'none (a CPU-only build)'}"]
    problem = None
    try:
        missing = missing_archs(required, compiled)
    except ValueError as exc:
        missing, problem = [], str(exc)
    if required:
        report.append(f"required (CUDA_ARCHS): {' '.join(required)}: "
                      + (f"MISSING {' '.join(missing)}" if missing else "all present"))
    if missing:
        problem = (f"this torch build ({torch.__version__}) has no kernels for {' '.join(missing)}, which CUDA_ARCHS "
                   f"names: choose a TORCH_BUILD that carries them and run `make venv` (see the README, GPUs)")
    if not args.build_only:
        launch = detect_launch()
        report += [f"driver: {driver()}", *gpus(compiled),
                   f"allocated GPUs: {allocated_gpus() or 'none'}",
                   f"launch: {launch.launcher}, rank {launch.rank} of {launch.world_size}, local rank "
                   f"{launch.local_rank}, host {socket.gethostname()}"]
        if problem is None:
            try:
                device = select_device(args.device, launch.local_rank)
                report.append(f"device: {device} (--device {args.device})")
            except DeviceError as exc:
                problem = str(exc)
        if problem is None and args.exercise:
            targets = ([torch.device("cuda", i) for i in range(torch.cuda.device_count())] if device.type == "cuda"
                       else [device])
            try:
                report += exercise(targets)
            except ExerciseFailed as exc:
                problem = str(exc)
    print("\n".join(f"doctor: {line}" for line in report), flush=True)
    if problem:
        print(f"doctor: error: {problem}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
