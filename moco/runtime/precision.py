"""Which mixed precision the device supports, decided once.

Training: bf16 autocast on CPUs with native bf16 (AVX-512 BF16 or AMX) and Ampere-or-newer GPUs; fp16 with a
GradScaler on older GPUs (V100); fp32 elsewhere. bf16 needs no loss scaling: its range equals fp32's.
Inference (validation, evaluation): fp16 on every GPU, whose 10-bit mantissa keeps scores and features closer to
fp32 than bf16's 7 bits, and fp32 on the CPU, where only scores would gain speed. Box geometry is fp32 under any
of them (demo.fp32_boxes). The few operations whose rounding the results depend on (InfoNCE's logits, the
detector's last scoring and box layers) run in true fp32 (``true_fp32``): outside autocast, and without TF32, which
every other fp32 matmul and convolution on Ampere and newer GPUs uses (moco.runtime.devices.configure_backends).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


MODES = ("auto", "bf16", "fp16", "off")


def add_inference_argument(parser) -> None:
    """The --precision flag of the entry points that only run the detector (demo.evaluate, demo.predict)."""
    parser.add_argument("--precision", default="auto", choices=MODES,
                        help="autocast dtype of the network; auto: fp16 on GPUs, fp32 on the CPU. Box geometry is fp32")


def autocast_dtype(device: torch.device, mode: str = "auto", inference: bool = False) -> torch.dtype | None:
    """mode: auto | bf16 | fp16 | off. Returns the autocast dtype, or None for fp32; ``inference`` picks auto's
    choice for evaluation rather than training."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"unknown precision mode {mode!r} ({', '.join(MODES)})")
    if device.type == "cuda":
        if inference:
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16() and not inference:
        return torch.bfloat16
    return None


@contextlib.contextmanager
def true_fp32(device_type: str) -> Iterator[None]:
    """fp32 arithmetic inside: autocast off, and on CUDA fp32 matmuls and convolutions in IEEE fp32 rather than
    TF32's 10-bit mantissa. The flags are global, so they are restored on the way out."""
    cuda_matmul, cudnn_conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = cuda_matmul.fp32_precision, cudnn_conv.fp32_precision
    cuda_matmul.fp32_precision = cudnn_conv.fp32_precision = "ieee"
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        cuda_matmul.fp32_precision, cudnn_conv.fp32_precision = saved


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None) -> bool:
    """One update; with fp16 the loss is scaled so small gradients do not underflow (bf16 and fp32 need no scaler).
    Returns whether the weights were updated: the GradScaler skips a step whose gradients are not finite, and
    lowers its scale then. With a scaler that answer is read from the device."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scale = scaler.get_scale()
    scaler.update()
    return scaler.get_scale() >= scale
