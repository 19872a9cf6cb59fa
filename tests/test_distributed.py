import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from moco.distributed import init_distributed, slurm_port

TRAIN_ARGS = ["-a", "resnet18", "--epochs", "2", "-b", "16", "--moco-k", "64", "--image-size", "32", "--mlp",
              "--aug-plus", "--cos", "--moco-t", "0.2", "-j", "0", "--lr", "0.05", "--save-freq", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_weights(prefix):
    w0, w1 = torch.load(f"{prefix}0.pt"), torch.load(f"{prefix}1.pt")
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key


def test_single_process_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.launcher, env.device.type) == (0, 1, "single", "cpu")
    assert not torch.distributed.is_initialized()


def test_slurm_port_follows_job_id_below_the_ephemeral_range():
    """Outgoing connections take their ports from 32768-60999 (Linux's default): a rendezvous port there can be
    taken by any connection on the node."""
    assert slurm_port("123") == slurm_port("123") != slurm_port("124")
    ports = [slurm_port(str(j)) for j in range(100_000)]
    assert min(ports) == 20000 and max(ports) == 32767


@pytest.mark.slow
def test_two_process_gloo_ddp_trains_and_ranks_agree(tiny_data, tmp_path, subprocess_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "tests/ddp_run.py", str(tmp_path / "rank"), "--",
           str(tiny_data / "train"), "--output-dir", str(out), *TRAIN_ARGS]
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600,
                            cwd=subprocess_env["PYTHONPATH"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launch torchrun: rank 0 of 2" in result.stdout
    _assert_same_weights(tmp_path / "rank")
    ckpt = torch.load(out / "checkpoint_0002.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and "module.encoder_q.conv1.weight" in ckpt["state_dict"]


@pytest.mark.slow
def test_slurm_srun_environment_is_detected(tiny_data, tmp_path, subprocess_env):
    """Two tasks with the variables srun gives them (no real Slurm here: that is the Slurm tier's job)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(subprocess_env, SLURM_JOB_ID="4242", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "tests/ddp_run.py", str(tmp_path / "rank"), "--", str(tiny_data / "train"),
               "--output-dir", str(tmp_path / "run"), *TRAIN_ARGS, "--epochs", "1"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert "launch slurm: rank 0 of 2" in outputs[0]
    _assert_same_weights(tmp_path / "rank")


@pytest.mark.parametrize("nodelist, first", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu[07-09,12],cpu3", "gpu07"), ("a1,b[2-3]", "a1"),
    ("rack[2-3]-node[04-05]", "rack2-node04"), ("x-[001-004]", "x-001"), ("c[5,1-2]", "c5")])
def test_first_host_reads_slurm_node_lists(nodelist, first):
    from moco.distributed import first_host

    assert first_host(nodelist) == first


def _no_scontrol(tmp_path, monkeypatch, script: str | None):
    """PATH with only a fake scontrol (or none): the tasks of a container without Slurm's commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        (bin_dir / "scontrol").write_text(script)
        (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_rendezvous_host_needs_no_slurm_commands(tmp_path, monkeypatch):
    from moco.distributed import _master_addr

    _no_scontrol(tmp_path, monkeypatch, None)
    assert _master_addr({"SLURM_JOB_NODELIST": "localhost,other"}) == "localhost"
    assert _master_addr({"SLURM_JOB_NODELIST": "x", "SLURM_STEP_NODELIST": "localhost"}) == "localhost"
    with pytest.raises(SystemExit, match=r"'no-such-node\.invalid' does not resolve.*set MASTER_ADDR"):
        _master_addr({"SLURM_JOB_NODELIST": "no-such-node.invalid,other"})


def test_rendezvous_host_falls_back_to_node_address(tmp_path, monkeypatch):
    """A node name that does not resolve would hang torch forever; Slurm's NodeAddr is used where scontrol is."""
    from moco.distributed import _master_addr

    _no_scontrol(tmp_path, monkeypatch, '#!/bin/sh\necho "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=x"\n')
    assert _master_addr({"SLURM_JOB_NODELIST": "no-such-node[1-2].invalid"}) == "10.1.2.3"


def test_a_task_whose_peers_never_come_stops_at_the_rendezvous_timeout(subprocess_env):
    """Rank 0 of 2 alone: it stops after MOCO_RENDEZVOUS_TIMEOUT with a sentence, not after half an hour."""
    env = dict(subprocess_env, SLURM_JOB_ID="4243", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), MOCO_RENDEZVOUS_TIMEOUT="2", MOCO_DEVICE="cpu")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", "from moco.distributed import init_distributed; init_distributed()"],
                            env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - started < 60, result.stderr[-2000:]
    assert "error: rank 0: the 2 tasks did not all meet at 127.0.0.1:" in result.stderr
    assert "within 2 s (MOCO_RENDEZVOUS_TIMEOUT)" in result.stderr


@pytest.mark.parametrize("value", ["ten", "0", "-5"])
def test_rendezvous_timeout_must_be_seconds(value):
    from moco.distributed import rendezvous_timeout

    assert rendezvous_timeout({}).total_seconds() == 600
    with pytest.raises(SystemExit, match=f"MOCO_RENDEZVOUS_TIMEOUT='{value}': a number of seconds"):
        rendezvous_timeout({"MOCO_RENDEZVOUS_TIMEOUT": value})
