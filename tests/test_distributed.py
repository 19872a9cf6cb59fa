import os
import socket
import subprocess
import sys

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


def test_slurm_port_follows_job_id():
    assert slurm_port("123") == slurm_port("123") != slurm_port("124")
    assert all(20000 <= slurm_port(str(j)) < 40000 for j in (1, 19999, 20000, 987654321))


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


def test_rendezvous_host_falls_back_to_node_address(tmp_path, monkeypatch):
    """A node name that does not resolve would hang torch forever; Slurm's NodeAddr is used instead."""
    from moco.distributed import _resolve_master_addr

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n'
                    'if [ "$2" = hostnames ]; then printf "%s\\n" no-such-node.invalid other; '
                    'else echo "NodeName=no-such-node.invalid Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=x"; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert _resolve_master_addr("no-such-node.invalid,other") == "10.1.2.3"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" localhost other\n')
    assert _resolve_master_addr("localhost,other") == "localhost"
