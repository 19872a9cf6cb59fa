"""One place that decides how this process was launched and joins the process group accordingly.

- torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, rendezvous already in the environment);
- Slurm ``srun``, one task per GPU, any number of nodes (``SLURM_STEP_NUM_TASKS`` > 1): the rendezvous host is
  the step's first node (``RENDEZVOUS_ADDR`` from the batch script or the site config, else read from the node
  list without Slurm's commands), the port ``RENDEZVOUS_PORT``, else derived from the job id, so jobs sharing a
  node never collide. ``MASTER_ADDR``/``MASTER_PORT`` are not read: sbatch carries them over from the submitting
  shell. The tasks wait ``$MOCO_RENDEZVOUS_TIMEOUT`` seconds for each other, then stop with a sentence saying so;
- anything else is a single process, with no process group.
The device comes from ``moco.runtime.devices.select_device`` (``--device``/``$MOCO_DEVICE``): ``cuda:<local rank>``, or
the CPU only when no GPU was allocated or the CPU was asked for; the backend is nccl on CUDA, gloo on CPU. A Slurm
task refuses a layout that leaves GPUs idle or puts two tasks on one GPU, and every multi-process run checks one
all_reduce across all its processes before any data is read.
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
# The site config's names for the rendezvous of a Slurm step (slurm/site.conf.example), which the batch script
# also uses to hand its computed address to tasks that may lack Slurm's commands.
ADDR_ENV, PORT_ENV = "RENDEZVOUS_ADDR", "RENDEZVOUS_PORT"


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
    """The first node of the step, as an address: its name, when it resolves, else Slurm's NodeAddr for it."""
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
                         f" set {ADDR_ENV} in the site config") from exc
    addr = re.search(r"NodeAddr=(\S+)", info.stdout)
    if not addr:
        raise SystemExit(f"error: Slurm node {first!r} does not resolve and has no NodeAddr: set {ADDR_ENV} in the "
                         f"site config")
    return addr.group(1)


def slurm_rendezvous(env) -> tuple[str, int]:
    """Where the tasks of a Slurm step meet: ``RENDEZVOUS_ADDR``/``RENDEZVOUS_PORT`` when set (the batch script or
    the site config), else the step's first node and ``slurm_port``. Never ``MASTER_ADDR``/``MASTER_PORT``: a
    localhost left in the submitting shell would keep a multi-node job waiting, a fixed port make two jobs on one
    node collide."""
    port = env.get(PORT_ENV) or str(slurm_port(env["SLURM_JOB_ID"]))
    if not port.isdigit():
        raise SystemExit(f"error: {PORT_ENV}={port!r}: a port number")
    return env.get(ADDR_ENV) or _master_addr(env), int(port)


def _gpu_list_length(value: str) -> int:
    return len([item for item in value.split(",") if item.strip()]) if value not in ("", "NoDevFiles", "-1") else 0


def _tasks_on_this_node(launch: Launch, env) -> int:
    """How many tasks of this step run on this node: ``SLURM_STEP_TASKS_PER_NODE`` ("4(x2),3") at this node's index
    in the step (``SLURM_NODEID``); at least this task's local rank + 1 where Slurm says nothing."""
    if launch.launcher == "single":
        return 1
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match[1])] * int(match[2] or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else launch.local_rank + 1


def task_layout_problem(launch: Launch, env, visible_gpus: int) -> str | None:
    """Why this Slurm task's layout misuses the GPUs it sees, or None. Every task of a node sees the same GPUs and
    takes ``cuda:<local rank % visible>``: fewer tasks than GPUs leave some idle (one task on 4 GPUs would train
    alone, and MoCo would switch to split BatchNorm, another recipe), more tasks share one. Where Slurm bound each
    task to GPUs of its own (``--gpus-per-task``: the node has more than this task sees), no two tasks share one and
    srun's request decides the rest. Outside Slurm and under torchrun, the layout is the user's choice."""
    if "SLURM_JOB_ID" not in env or launch.launcher == "torchrun" or visible_gpus < 1:
        return None
    node_gpus = (int(env["SLURM_GPUS_ON_NODE"]) if env.get("SLURM_GPUS_ON_NODE", "").isdigit()
                 else _gpu_list_length(env.get("SLURM_JOB_GPUS", "")))
    if node_gpus > visible_gpus:
        return None
    tasks = _tasks_on_this_node(launch, env)
    if tasks == visible_gpus:
        return None
    host = socket.gethostname()
    fix = (f"run one task per GPU (srun --ntasks-per-node={visible_gpus}; in the job scripts TASKS_PER_NODE unset "
           f"or {visible_gpus})")
    if tasks < visible_gpus:
        return (f"{tasks} Slurm task(s) on {host} see {visible_gpus} GPUs and use one each, so "
                f"{visible_gpus - tasks} would sit idle: {fix}")
    return (f"{tasks} Slurm tasks on {host} see {visible_gpus} GPU(s), so local ranks 0 and {visible_gpus} would "
            f"both take cuda:0: {fix}")


def detect_launch(env=os.environ) -> Launch:
    """How this process was started, from the environment alone (no process group is joined). Inside a Slurm step
    of several tasks, ``RANK``/``WORLD_SIZE`` count only where torchrun's agent set them (``TORCHELASTIC_RUN_ID``):
    sbatch carries a ``RANK=0 WORLD_SIZE=1`` left in the submitting shell into every task, which would make each
    task train alone into the same run."""
    slurm_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "RANK" in env and "WORLD_SIZE" in env and (slurm_tasks == 1 or "TORCHELASTIC_RUN_ID" in env):
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if slurm_tasks > 1:
        return Launch("slurm", int(env["SLURM_PROCID"]), slurm_tasks, int(env["SLURM_LOCALID"]))
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
    ``moco.runtime.devices.DeviceError`` before any rendezvous when GPUs were allocated but CUDA cannot use them.
    ``timeout_minutes`` bounds every collective (rank 0 scores validation while the others wait for its outcome)."""
    env = os.environ
    launch = detect_launch(env)
    launcher, rank, world_size, local_rank = launch.launcher, launch.rank, launch.world_size, launch.local_rank
    if launcher == "slurm":
        addr, port = slurm_rendezvous(env)
        # for whatever else reads them in this process, in place of values the submitting shell left
        env.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_RANK=str(local_rank))
    elif launcher == "single" and int(env.get("SLURM_NTASKS", "1")) > 1:
        log.warning("Slurm allocated %s tasks but this process was not started by srun: running alone",
                    env["SLURM_NTASKS"])
    try:
        device = select_device(device, local_rank)
    except DeviceError as exc:  # before any rendezvous or data: the user's to fix, in one sentence
        raise SystemExit(f"error: {exc}") from exc
    problem = task_layout_problem(launch, env, torch.cuda.device_count()) if device.type == "cuda" else None
    if problem:
        raise SystemExit(f"error: {problem}")

    if world_size > 1:
        group = dict(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                     timeout=datetime.timedelta(minutes=timeout_minutes),
                     **({"device_id": device} if device.type == "cuda" else {}))
        if launcher == "slurm":
            dist.init_process_group(store=_rendezvous(env, rank, world_size), **group)
        else:  # torchrun's agent runs the rendezvous
            dist.init_process_group(init_method="env://", **group)
        check_first_collective(device, rank, world_size)
    return DistEnv(rank, world_size, local_rank, device, launcher)


def _where(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{socket.gethostname()}, {device}"
    return f"{socket.gethostname()}, {device} ({torch.cuda.get_device_name(device)})"


def check_first_collective(device: torch.device, rank: int, world_size: int) -> None:
    """One all_reduce of ones across every process, before any data is read: a transport that cannot carry it (a
    GPU that NCCL cannot use, a blocked interface between nodes) fails here, naming this host and device, instead of
    in the first training step. The sum must be the world size."""
    ones = torch.ones(1, device=device)
    try:
        dist.all_reduce(ones)
        total = ones.item()
    except RuntimeError as exc:  # torch's DistError and its backend errors are RuntimeErrors, and so are CUDA's
        first_line = (str(exc).strip().splitlines() or [""])[0]  # NCCL's messages run on for lines
        raise SystemExit(f"error: rank {rank} of {world_size} on {_where(device)}: the first all_reduce across all "
                         f"tasks failed ({type(exc).__name__}: {first_line}); NCCL_DEBUG=INFO "
                         f"in the site config logs the transports tried") from exc
    if total != world_size:
        raise SystemExit(f"error: rank {rank} of {world_size} on {_where(device)}: the first all_reduce across all "
                         f"tasks summed to {total:g}, not {world_size}; NCCL_DEBUG=INFO in the site config logs the "
                         f"transports tried")


def _rendezvous(env, rank: int, world_size: int) -> dist.TCPStore:
    """Rank 0 serves the store at the step's rendezvous (MASTER_ADDR:MASTER_PORT, set from ``slurm_rendezvous``)
    and waits for all ranks; the others connect to it."""
    addr, port, wait = env["MASTER_ADDR"], int(env["MASTER_PORT"]), rendezvous_timeout(env)
    try:
        return dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=wait)
    except (RuntimeError, OSError) as exc:  # DistStoreError and DistNetworkError are RuntimeErrors
        raise SystemExit(f"error: rank {rank}: the {world_size} tasks did not all meet at {addr}:{port} within "
                         f"{wait.total_seconds():.0f} s ({RENDEZVOUS_ENV}): a task that never started, or a node that "
                         f"cannot reach {addr} (NCCL_SOCKET_IFNAME, {ADDR_ENV} in the site config). "
                         f"{type(exc).__name__}: {exc}") from exc


def cleanup_distributed() -> None:
    """Leave the process group, once the DDP model is gone. Its reducer holds the group, and a group destroyed by
    that holder is destroyed holding the GIL: it then waits for a gloo worker thread that needs the GIL to release
    the last collective's tensors, and the process hangs at exit (seen after a failure broadcast by
    runs.decided_by_rank0). Destroyed by destroy_process_group, the group lets go of the GIL first. DDP keeps
    itself in a reference cycle, hence the collection; the frames of an error must have released it (see
    moco.runtime.failures.exit_statuses)."""
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

    MoCo's DDP does not broadcast buffers (``broadcast_buffers=False``: the queue would go out every step), so each
    rank's statistics follow its own shard; averaging before a save makes the saved model reflect every rank's data
    and the ranks agree.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for name, buffer in module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())
