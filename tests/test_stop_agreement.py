"""A stop requested on one rank stops every rank at the same step (two gloo processes; slow tier)."""
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RANK = """
import os, signal, sys
import torch
import torch.distributed as dist
from moco.runtime import preemption

rank, port = int(sys.argv[1]), sys.argv[2]
preemption.install()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cpu = torch.device("cpu")
answers = [preemption.stop_requested(cpu)]  # nobody asked yet
if rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told, as when Slurm signals one task first
answers.append(preemption.stop_requested(cpu))
# Inside the loops the ranks agree only every POLL_STEPS steps: in between nobody stops, at the next multiple all do.
answers.append(preemption.stop_requested(cpu, preemption.POLL_STEPS + 3))
answers.append(preemption.stop_requested(cpu, 2 * preemption.POLL_STEPS))
print(rank, answers, flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(source: str, tmp_path, env) -> list[str]:
    """Runs ``source`` as ranks 0 and 1 (argv: rank, port) and returns the last line each printed."""
    script = tmp_path / "rank.py"
    script.write_text(source)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], env=env, cwd=env["PYTHONPATH"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return [o.strip().splitlines()[-1] for o in outputs]


def test_a_signal_on_one_rank_stops_both(tmp_path, subprocess_env):
    assert run_two_ranks(RANK, tmp_path, subprocess_env) == ["0 [False, True, False, True]",
                                                             "1 [False, True, False, True]"]
