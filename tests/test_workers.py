"""Data-loader workers under Slurm's stop signals (moco.runtime.workers), and the stop check inside inference.

Slurm's signals come from slurmstepd, not from the loader's process: the tests send theirs with kill(1), since a
SIGTERM from the loader's own process is how it ends a worker.
"""
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from loader_items import SlowItems, SlowToStart

from demo import engine
from moco.runtime import preemption
from moco.runtime.workers import DataLoader

METHODS = ["fork", "forkserver"]


def _kill(pids, *signals):
    """Each signal to all ``pids`` from one kill(1): a worker that dies of the first makes torch's loader end
    the others at once, before a second kill(1) could reach them."""
    for sig in signals:
        subprocess.run(["kill", "-s", sig, *map(str, pids)], check=True)


@pytest.mark.parametrize("method", METHODS)
def test_workers_outlive_stop_signals_mid_epoch(method):
    """SIGUSR1 and SIGTERM from the batch script and Slurm, SIGUSR2 from submitit's --signal (without B:, it reaches
    every process)."""
    loader = DataLoader(SlowItems(), batch_size=2, num_workers=2, multiprocessing_context=method,
                        persistent_workers=True)
    items, pids = [], []
    for batch in loader:
        items += batch[:, 0].tolist()
        pids.append(set(batch[:, 1].tolist()))
        if len(pids) == 2:  # one batch from each worker
            _kill(set.union(*pids), "TERM", "USR1", "USR2")
    assert items == list(range(32))
    assert set.union(*pids[2:]) == set.union(*pids[:2])  # the same two workers served the rest of the epoch


def test_a_signal_during_a_workers_start_up_waits():
    before = set(multiprocessing.active_children())
    loader = DataLoader(SlowToStart(), batch_size=2, num_workers=2, multiprocessing_context="forkserver")
    batches = iter(loader)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    _kill([w.pid for w in workers], "TERM", "USR1")  # while they unpickle the dataset
    assert [i for batch in batches for i in batch[:, 0].tolist()] == list(range(32))


JOB_STEP = """
import multiprocessing, sys, time
import torch
from moco.runtime import preemption
from moco.runtime.workers import DataLoader

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        time.sleep(0.02)
        return i

if __name__ == "__main__":
    preemption.install()
    # Batches of plain ints (collate_fn=list): a tensor batch hands over its shared memory through a socket of the
    # worker that made it, and reading a batch queued by a worker that is now dead fails with ConnectionResetError
    # before torch's loader can see the death, in about 1 run in 7 under forkserver.
    loader = (DataLoader if sys.argv[2] == "guarded" else torch.utils.data.DataLoader)(
        Slow(), batch_size=2, num_workers=2, multiprocessing_context=sys.argv[1], persistent_workers=True,
        collate_fn=list)
    batches = iter(loader)
    print("workers", *(w.pid for w in multiprocessing.active_children()), flush=True)
    for step, batch in enumerate(batches):
        if preemption.stop_requested():
            raise SystemExit(preemption.EXIT_REQUEUE)  # workers alive, mid-epoch
        print("step", step, flush=True)
"""


def _signal_job_step(tmp_path, env, method: str, loader: str, sig: signal.Signals,
                     workers_only: bool = False) -> tuple[int, str, float]:
    """A loop over a loader in its own process group; at its step 2, ``sig`` to the whole group (as Slurm signals
    every process of a job step) or to the workers only. Returns (exit status, output, seconds to the exit)."""
    script = tmp_path / "job_step.py"
    script.write_text(JOB_STEP)
    proc = subprocess.Popen([sys.executable, str(script), method, loader], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("step 2"):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        if workers_only:
            _kill([int(pid) for pid in lines[0].split()[1:]], sig.name[3:])
        else:
            os.killpg(proc.pid, sig)
        start = time.monotonic()
        output = proc.communicate(timeout=30)[0]
        return proc.returncode, output, time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("method", METHODS)
def test_a_stop_with_workers_alive_exits_promptly(method, tmp_path, subprocess_env):
    """The loop stops and the process exits with the stop's status, instead of hanging at exit in
    multiprocessing's join of workers that ignore SIGTERM."""
    status, output, seconds = _signal_job_step(tmp_path, subprocess_env, method, "guarded", signal.SIGTERM)
    assert status == preemption.EXIT_REQUEUE, output
    assert "Traceback" not in output, output
    assert seconds < 10


@pytest.mark.parametrize("method, sig", [("fork", signal.SIGTERM), ("forkserver", signal.SIGUSR1)],
                         ids=["fork-SIGTERM", "forkserver-SIGUSR1"])
def test_workers_of_torchs_own_loader_die_of_the_signal(method, sig, tmp_path, subprocess_env):
    """What the guard prevents: torch's worker re-raises a SIGTERM that its parent did not send, and SIGUSR1 kills
    a forkserver worker (a forked one survives it only by inheriting the parent's handler)."""
    status, output, _ = _signal_job_step(tmp_path, subprocess_env, method, "torch", sig, workers_only=True)
    assert status == 1
    # Under forkserver the worker is not the main process's child: no SIGCHLD, its death is found by a timeout.
    assert re.search(r"DataLoader worker \(pid.* (is killed by signal|exited unexpectedly)", output), output


class Images(torch.utils.data.Dataset):
    """8x8 images, one a batch in these tests."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8, dtype=torch.uint8), {"image_id": i}

    def aspect_ratios(self):
        return [1.0] * self.n


class Detector(torch.nn.Module):
    """No detections; before its batch number ``stop_at`` the job is told to stop, as Slurm would."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.stop_at, self.batches = stop_at, 0

    def forward(self, images):
        if self.batches == self.stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.batches += 1
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    preemption.reset()
    preemption.install()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption.reset()


@pytest.mark.parametrize("workers", [0, 2])
def test_inference_stops_at_the_next_batch(handlers, workers):
    detector = Detector(stop_at=1)  # the signal lands during batch 1
    with pytest.raises(preemption.Preempted, match="stopped by SIGUSR1 at step 2"):
        engine.predict(detector, Images(6), torch.device("cpu"), None, 1, workers)
    assert detector.batches == 2


def test_every_rank_polls_as_often(monkeypatch):
    """Rank 0 of 2 has 3 of the 5 batches, rank 1 has 2: both poll 3 times, since under DDP a poll is a
    collective that every rank joins."""
    def gather_object(obj, gathered, dst):
        if gathered is not None:
            gathered[:] = [obj, {}]

    polls = []
    monkeypatch.setattr(preemption, "stop_requested", lambda device, step=None: polls.append(step) or False)
    monkeypatch.setattr(engine.dist, "gather_object", gather_object)
    for rank in (0, 1):
        polls.clear()
        engine.predict(Detector(), Images(5), torch.device("cpu"), None, 1, 0, rank, 2)
        assert polls == [0, 1, 2], rank
