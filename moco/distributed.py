"""One place that decides how this process was launched and joins the process group accordingly.

- torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, rendezvous already in the environment);
- Slurm ``srun``, one task per GPU, any number of nodes (``SLURM_STEP_NUM_TASKS`` > 1): the rendezvous host is
  the step's first node (``MASTER_ADDR`` from the batch script, else read from the node list without Slurm's
  commands), the port derives from the job id, so jobs sharing a node never collide; the tasks wait
  ``$MOCO_RENDEZVOUS_TIMEOUT`` seconds for each other, then stop with a sentence saying so;
- anything else is a single process, with no process group.
The device comes from ``moco.devices.select_device`` (``--device``/``$MOCO_DEVICE``): ``cuda:<local rank>``, or
the CPU only when no GPU was allocated or the CPU was asked for; the backend is nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import DeviceError, select_device
from .logger import get_logger

log = get_logger(__name__)

RENDEZVOUS_ENV = "MOCO_RENDEZVOUS_TIMEOUT"


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
    """A port in [20000, 32768) fixed by the job id: all tasks agree on it without talking, jobs sharing a node
    differ, and it stays below Linux's ephemeral range (32768-60999), where outgoing connections take theirs."""
    return 20000 + int(job_id) % 12768


def first_host(nodelist: str) -> str:
    """The first node of a Slurm node list ("gpu[07-09,12],cpu3" -> "gpu07"), read without Slurm's commands: the
    tasks may run in a container that has none."""
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)  # up to the first comma outside brackets
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def _master_addr(env) -> str:
    """The first node of the step, as an address: the batch script exports it (common.sh found it on the host);
    otherwise its name, when it resolves, else Slurm's NodeAddr for it."""
    first = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    try:
        socket.getaddrinfo(first, None)
        return first
    except socket.gaierror:
        pass
    try:  # torch would wait forever on a name that does not resolve
        info = subprocess.run(["scontrol", "show", "node", "-o", first], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"error: Slurm node {first!r} does not resolve and scontrol cannot say its address ({exc}):"
                         f" set MASTER_ADDR") from exc
    addr = re.search(r"NodeAddr=(\S+)", info.stdout)
    if not addr:
        raise SystemExit(f"error: Slurm node {first!r} does not resolve and has no NodeAddr: set MASTER_ADDR")
    return addr.group(1)


def detect_launch(env=os.environ) -> Launch:
    """How this process was started, from the environment alone (no process group is joined)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return Launch("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_LOCALID"]))
    return Launch("single", 0, 1, 0)


def rendezvous_timeout(env=os.environ) -> datetime.timedelta:
    """How long the tasks of a Slurm step wait for each other at the start: ``$MOCO_RENDEZVOUS_TIMEOUT`` seconds
    (the site config's), 600 by default. Short beside the collectives' timeout, so that a node that never starts
    costs minutes of the other nodes' GPUs, not half an hour."""
    value = env.get(RENDEZVOUS_ENV) or "600"
    if not value.isdigit() or int(value) == 0:
        raise SystemExit(f"error: {RENDEZVOUS_ENV}={value!r}: a number of seconds")
    return datetime.timedelta(seconds=int(value))


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Join the process group of this launch on the device ``select_device(device)`` gives this rank; raises
    ``moco.devices.DeviceError`` before any rendezvous when GPUs were allocated but CUDA cannot use them.
    ``timeout_minutes`` bounds every collective (rank 0 scores validation while the others wait for its outcome)."""
    env = os.environ
    launch = detect_launch(env)
    launcher, rank, world_size, local_rank = launch.launcher, launch.rank, launch.world_size, launch.local_rank
    if launcher == "slurm":
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _master_addr(env)
        env.setdefault("MASTER_PORT", str(slurm_port(env["SLURM_JOB_ID"])))
    elif launcher == "single" and int(env.get("SLURM_NTASKS", "1")) > 1:
        log.warning("Slurm allocated %s tasks but this process was not started by srun: running alone",
                    env["SLURM_NTASKS"])
    try:
        device = select_device(device, local_rank)
    except DeviceError as exc:  # before any rendezvous or data: the user's to fix, in one sentence
        raise SystemExit(f"error: {exc}") from exc

    if world_size > 1:
        group = dict(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                     timeout=datetime.timedelta(minutes=timeout_minutes),
                     **({"device_id": device} if device.type == "cuda" else {}))
        if launcher == "slurm":
            dist.init_process_group(store=_rendezvous(env, rank, world_size), **group)
        else:  # torchrun's agent runs the rendezvous
            dist.init_process_group(init_method="env://", **group)
    return DistEnv(rank, world_size, local_rank, device, launcher)


def _rendezvous(env, rank: int, world_size: int) -> dist.TCPStore:
    """Rank 0 serves the store at MASTER_ADDR:MASTER_PORT and waits for all ranks; the others connect to it."""
    addr, port, wait = env["MASTER_ADDR"], int(env["MASTER_PORT"]), rendezvous_timeout(env)
    try:
        return dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=wait)
    except (RuntimeError, OSError) as exc:  # DistStoreError and DistNetworkError are RuntimeErrors
        raise SystemExit(f"error: rank {rank}: the {world_size} tasks did not all meet at {addr}:{port} within "
                         f"{wait.total_seconds():.0f} s ({RENDEZVOUS_ENV}): a task that never started, or a node that "
                         f"cannot reach {addr} (NCCL_SOCKET_IFNAME, MASTER_ADDR in the site config). "
                         f"{type(exc).__name__}: {exc}") from exc


def cleanup_distributed() -> None:
    """Leave the process group, once the DDP model is gone. Its reducer holds the group, and a group destroyed by
    that holder is destroyed holding the GIL: it then waits for a gloo worker thread that needs the GIL to release
    the last collective's tensors, and the process hangs at exit (seen after a failure broadcast by
    runs.decided_by_rank0). Destroyed by destroy_process_group, the group lets go of the GIL first. DDP keeps
    itself in a reference cycle, hence the collection; the frames of an error must have released it (see
    moco.failures.exit_statuses)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


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
