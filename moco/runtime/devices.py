"""Which device a process runs on, decided once for every entry point, and refused loudly rather than guessed.

``--device auto`` (the default, or ``$MOCO_DEVICE``) takes the GPU of the process's local rank when CUDA works,
and the CPU only when no GPU was allocated. A job that was given GPUs (Slurm's GPU variables or
``CUDA_VISIBLE_DEVICES``) but cannot use them (no driver, a container started without ``--nv``, a torch build
without kernels for the GPU) stops with one sentence saying why, instead of training on the CPU for a day.
Running on the CPU on purpose is ``--device cpu`` or ``MOCO_DEVICE=cpu``.
"""
from __future__ import annotations

import os
import re

import torch

DEVICE_ENV = "MOCO_DEVICE"
CHOICES = ("auto", "cuda", "cpu")
# Variables through which a launcher says this process has GPUs. Slurm sets the first three with --gres/--gpus.
# The first is a count; the others list GPU indices, so there "0" is the first GPU.
GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
_NO_GPU_VALUES = ("", "-1", "none", "NoDevFiles")


class DeviceError(RuntimeError):
    """The job cannot run where it was asked to; the message is the one sentence a user needs."""


def default_device() -> str:
    return os.environ.get(DEVICE_ENV, "auto") or "auto"


def add_device_argument(parser) -> None:
    """The entry points' shared --device flag."""
    parser.add_argument("--device", default=default_device(), choices=CHOICES,
                        help="auto: this rank's GPU, the CPU only when no GPU was allocated (else it stops); cpu: "
                             f"on purpose. Default: ${DEVICE_ENV}, else auto")


def allocated_gpus(env=os.environ) -> str:
    """The variables saying this process was given GPUs ("NAME=value ..."), or "" when none says so."""
    def gives_gpus(name: str) -> bool:
        value = env.get(name, "").strip()
        return value not in _NO_GPU_VALUES and not (name == "SLURM_GPUS_ON_NODE" and value == "0")

    return " ".join(f"{name}={env[name]}" for name in GPU_VARIABLES if gives_gpus(name))


def parse_arch(arch: str) -> tuple[str, int, int, str] | None:
    """'sm_86' -> ('sm', 8, 6, ''); 'sm_90a' -> ('sm', 9, 0, 'a'); 'compute_120' -> ('compute', 12, 0, '')."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
    return (match[1], int(match[2]), int(match[3]), match[4]) if match else None


def arch_covered(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with these compiled architectures runs on a GPU of this compute capability.

    Machine code (sm_XY) runs on GPUs of the same major version and an equal or later minor one ('a' variants only
    on exactly that GPU); PTX (compute_XY) is compiled by the driver for any GPU of that capability or newer."""
    major, minor = capability
    for arch in arch_list:
        parsed = parse_arch(arch)
        if parsed is None:
            continue
        kind, m, n, variant = parsed
        if kind == "sm" and m == major and (n == minor if variant == "a" else n <= minor):
            return True
        if kind == "compute" and (m, n) <= (major, minor):
            return True
    return False


def sm_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def compiled_archs() -> list[str]:
    """The GPU architectures this torch build carries code for. Read from the build itself: torch's public
    ``get_arch_list()`` answers [] whenever no GPU is usable, which is exactly when the answer matters."""
    flags = torch._C._cuda_getArchFlags() if torch.backends.cuda.is_built() else None
    return flags.split() if flags else []


def build_summary() -> str:
    archs = " ".join(compiled_archs()) or "none"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, kernels: {archs})"


def cuda_problem() -> str | None:
    """None when CUDA can run this build's kernels on every visible GPU; else why not, in torch's words."""
    if not torch.backends.cuda.is_built():
        return "this torch build has no CUDA support"
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError, with the driver's own reason
        return re.split(r"(?<=\.)\s", str(exc).strip())[0].rstrip(".")  # its first sentence: the reason
    if torch.cuda.device_count() == 0:
        return "CUDA sees no GPU"
    archs = compiled_archs()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if not arch_covered(capability, archs):
            return (f"GPU {index} ({torch.cuda.get_device_name(index)}, {sm_name(capability)}) has no kernels in "
                    f"this build; install a torch build for it (TORCH_BUILD in the Makefile, see the README)")
    return None


def refusal(problem: str, given: str) -> str:
    reason = f"this job was given GPUs ({given})" if given else "--device cuda was asked for"
    return (f"{reason} but CUDA cannot use them: {problem}; {build_summary()}. Run `python -m moco.runtime.doctor` for "
            f"details, or run on the CPU on purpose with --device cpu or {DEVICE_ENV}=cpu")


def select_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """The device of this process: ``cuda:<local rank>`` (modulo the visible GPUs) or the CPU; see the module doc.
    Raises ``DeviceError`` when GPUs were allocated or asked for and CUDA cannot use them."""
    requested = requested or default_device()
    if requested not in CHOICES:
        raise DeviceError(f"device {requested!r}: one of {', '.join(CHOICES)} (from --device or ${DEVICE_ENV})")
    if requested == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    given = allocated_gpus()
    if not given and torch.cuda.device_count():  # visible but unusable, e.g. no kernels for them in this build
        given = f"{torch.cuda.device_count()} visible GPU(s)"
    if requested == "cuda" or given:
        raise DeviceError(refusal(problem, given))
    return torch.device("cpu")


def configure_backends(device: torch.device, fixed_shapes: bool) -> None:
    """GPU speed settings every entry point wants: TF32 for the fp32 matrix work left outside autocast (Ampere and
    newer; ignored on older GPUs and the CPU), except what ``moco.runtime.precision.true_fp32`` keeps exact; and cuDNN's
    autotuner when every batch has the same shape (MoCo's crops), where the first steps' search pays back;
    detection's varying image sizes would search again and again."""
    if device.type != "cuda":
        return
    # torch's newer per-backend flags only: reading a legacy flag after mixing the two APIs raises.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default, stated
    torch.backends.cudnn.benchmark = fixed_shapes
