"""Which mixed precision the device supports, decided once.

bf16 autocast on CPUs with native bf16 (AVX-512 BF16 or AMX) and Ampere-or-newer GPUs; fp16 with a
GradScaler on older GPUs (V100); fp32 elsewhere. bf16 needs no loss scaling: its range equals fp32's.
"""
from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """mode: auto | bf16 | fp16 | off. Returns the autocast dtype, or None for fp32."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"unknown precision mode {mode!r} (auto, bf16, fp16, off)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One update; with fp16 the loss is scaled so small gradients do not underflow (bf16 and fp32 need no scaler)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
