"""One place that decides how this process was launched and joins the process group accordingly.

- torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, rendezvous already in the environment);
- Slurm ``srun``, one task per GPU, any number of nodes (``SLURM_STEP_NUM_TASKS`` > 1): the rendezvous host is
  the step's first node, the port derives from the job id, so jobs sharing a node never collide;
- anything else is a single process, with no process group.
The device comes from ``moco.devices.select_device`` (``--device``/``$MOCO_DEVICE``): ``cuda:<local rank>``, or
the CPU only when no GPU was allocated or the CPU was asked for; the backend is nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import DeviceError, select_device
from .logger import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def slurm_port(job_id: str) -> int:
    """A port in [20000, 40000) fixed by the job id: all tasks agree on it without talking."""
    return 20000 + int(job_id) % 20000


def _resolve_master_addr(nodelist: str) -> str:
    """The first node of a Slurm node list, as an address this host can reach."""
    first = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    try:
        socket.getaddrinfo(first, None)
        return first
    except socket.gaierror:
        # torch waits forever on a name that does not resolve; Slurm knows the node's address.
        info = subprocess.run(["scontrol", "show", "node", first], check=True, capture_output=True, text=True).stdout
        for field in info.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
        raise RuntimeError(f"Slurm node {first!r} does not resolve and has no NodeAddr")


def detect_launch(env=os.environ) -> Launch:
    """How this process was started, from the environment alone (no process group is joined)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return Launch("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_LOCALID"]))
    return Launch("single", 0, 1, 0)


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Join the process group of this launch on the device ``select_device(device)`` gives this rank; raises
    ``moco.devices.DeviceError`` before any rendezvous when GPUs were allocated but CUDA cannot use them."""
    env = os.environ
    launch = detect_launch(env)
    launcher, rank, world_size, local_rank = launch.launcher, launch.rank, launch.world_size, launch.local_rank
    if launcher == "slurm":
        if "MASTER_ADDR" not in env:  # a site or user may pin it; only then is scontrol not needed
            env["MASTER_ADDR"] = _resolve_master_addr(env.get("SLURM_STEP_NODELIST", env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(slurm_port(env["SLURM_JOB_ID"])))
    elif launcher == "single" and int(env.get("SLURM_NTASKS", "1")) > 1:
        log.warning("Slurm allocated %s tasks but this process was not started by srun: running alone",
                    env["SLURM_NTASKS"])
    try:
        device = select_device(device, local_rank)
    except DeviceError as exc:  # before any rendezvous or data: the user's to fix, in one sentence
        raise SystemExit(f"error: {exc}") from exc

    if world_size > 1:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistEnv(rank, world_size, local_rank, device, launcher)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


@torch.no_grad()
def average_running_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP broadcasts rank 0's buffers at the start of every forward, so after the last step each rank holds
    statistics of its own shard; averaging makes the saved model reflect every rank's data and the ranks agree.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for name, buffer in module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())
