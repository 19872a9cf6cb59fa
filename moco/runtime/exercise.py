"""Real work for the preflight (``python -m moco.runtime.doctor --exercise``): a GPU can be listed, and even take
kernels, yet compute garbage or fault under load (a failing card, a bad driver, ECC errors). Every device named here
runs about a second of the mixed-precision matrix multiplications and convolutions that training runs, and every
result must be finite and agree with an fp32 computation on the CPU. A failure is one sentence naming the host and
the GPU.

On CUDA: fp16 everywhere, bf16 where the GPU has it natively. On the CPU (the tests, ``--device cpu``) the same code
runs a short version of it, in bf16 and fp16.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Largest deviation from fp32 over the RMS of the fp32 result. Rounding the inputs to bf16 (8 significant bits) or
# fp16 (11) moves the result by a few units of that rounding; a broken kernel or card is off by the whole result.
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# (matmul side, convolution batch, channels, side): large enough to keep a GPU busy, small enough for a quick fp32
# reference on the host.
SIZES = {"cuda": (2048, 16, 128, 56), "cpu": (256, 4, 32, 28)}
SYNC_EVERY = 8  # launches between waits for the GPU, so the clock measures its work, not the launch queue


class ExerciseFailed(RuntimeError):
    """The one sentence the preflight reports: which host and GPU failed, at what."""


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def _convolution(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1)


OPS = {"matmul": _matmul, "convolution": _convolution}


def inputs(op: str, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed fp32 operands on the CPU, scaled so that every output element has about unit variance."""
    side, batch, channels, spatial = SIZES[device_type]
    generator = torch.Generator().manual_seed(0)
    if op == "matmul":
        return (torch.randn(side, side, generator=generator),
                torch.randn(side, side, generator=generator) / side**0.5)
    return (torch.randn(batch, channels, spatial, spatial, generator=generator),
            torch.randn(channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5)


def dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type != "cuda":
        return [torch.bfloat16, torch.float16]
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    return [torch.float16] + ([torch.bfloat16] if native_bf16 else [])


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
    name = "the CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{name} ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _exercise_one(op: str, dtype: torch.dtype, device: torch.device, reference: torch.Tensor, seconds: float
                  ) -> tuple[int, int, float]:
    """Runs ``op`` in ``dtype`` on ``device`` for ``seconds``; returns (runs, non-finite values, largest deviation
    from ``reference`` over its RMS). Results are checked on the device and read back once."""
    a, b = (t.to(device=device, dtype=dtype) for t in inputs(op, device.type))
    expected = reference.to(device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    worst = torch.zeros((), device=device)
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < seconds:
        for _ in range(SYNC_EVERY):
            out = OPS[op](a, b).float()
            bad += (~torch.isfinite(out)).sum()
            worst = torch.maximum(worst, (out - expected).abs().nan_to_num(0.0, 0.0, 0.0).max())
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rms = float(reference.pow(2).mean().sqrt())
    return runs, int(bad), float(worst) / rms


def exercise(devices: list[torch.device], seconds: float | None = None) -> list[str]:
    """About ``seconds`` (default: 1 on a GPU, 0.2 on the CPU) of work on each device; one report line per
    (dtype, op) and device. Raises ``ExerciseFailed`` at the first failure."""
    host = socket.gethostname()
    references: dict[tuple[str, str], torch.Tensor] = {}
    lines = []
    for device in devices:
        budget = seconds if seconds is not None else (1.0 if device.type == "cuda" else 0.2)
        pairs = [(op, dtype) for dtype in dtypes(device) for op in OPS]
        where = f"{describe(device)} on host {host}"
        for op, dtype in pairs:
            name = NAMES[dtype]
            key = (op, device.type)
            if key not in references:
                references[key] = OPS[op](*inputs(op, device.type))
            try:
                runs, bad, deviation = _exercise_one(op, dtype, device, references[key], budget / len(pairs))
            except RuntimeError as exc:  # a CUDA error or a missing kernel, in torch's words
                raise ExerciseFailed(f"{where}: {name} {op} failed: {_first_line(exc)}") from exc
            shape = "x".join(map(str, references[key].shape))
            if bad:
                raise ExerciseFailed(f"{where}: {name} {op} gave {bad} non-finite values over {runs} runs of a "
                                     f"{shape} result")
            if not deviation <= TOLERANCE[dtype]:
                raise ExerciseFailed(f"{where}: {name} {op} differs from fp32 by {deviation:.3g} of the result's RMS "
                                     f"(tolerance {TOLERANCE[dtype]:g})")
            lines.append(f"exercise: {describe(device)}: {name} {op} ({shape}), {runs} runs: finite, largest "
                         f"deviation from fp32 {deviation:.2g} of the RMS (tolerance {TOLERANCE[dtype]:g})")
    return lines
