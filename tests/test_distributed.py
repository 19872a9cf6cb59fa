import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from moco.runtime.distributed import init_distributed, slurm_port

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
                   RENDEZVOUS_ADDR="127.0.0.1", RENDEZVOUS_PORT=str(port))
        cmd = [sys.executable, "tests/ddp_run.py", str(tmp_path / "rank"), "--", str(tiny_data / "train"),
               "--output-dir", str(tmp_path / "run"), *TRAIN_ARGS, "--epochs", "1"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert "launch slurm: rank 0 of 2" in outputs[0]
    _assert_same_weights(tmp_path / "rank")


@pytest.mark.parametrize("extra, launch", [
    ({}, ("slurm", 1, 2, 1)),  # a RANK/WORLD_SIZE left in the submitting shell: srun's counts win
    ({"TORCHELASTIC_RUN_ID": "7"}, ("torchrun", 0, 1, 0)),  # torchrun started inside each task sets its own
    ({"SLURM_STEP_NUM_TASKS": "1"}, ("torchrun", 0, 1, 0)),  # one srun task running torchrun
])
def test_leftover_rank_variables_do_not_override_srun(extra, launch):
    from moco.runtime.distributed import detect_launch

    env = {"RANK": "0", "WORLD_SIZE": "1", "SLURM_JOB_ID": "9", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "1", **extra}
    found = detect_launch(env)
    assert (found.launcher, found.rank, found.world_size, found.local_rank) == launch


@pytest.mark.parametrize("nodelist, first", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu[07-09,12],cpu3", "gpu07"), ("a1,b[2-3]", "a1"),
    ("rack[2-3]-node[04-05]", "rack2-node04"), ("x-[001-004]", "x-001"), ("c[5,1-2]", "c5")])
def test_first_host_reads_slurm_node_lists(nodelist, first):
    from moco.runtime.distributed import first_host

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
    from moco.runtime.distributed import _master_addr

    _no_scontrol(tmp_path, monkeypatch, None)
    assert _master_addr({"SLURM_JOB_NODELIST": "localhost,other"}) == "localhost"
    assert _master_addr({"SLURM_JOB_NODELIST": "x", "SLURM_STEP_NODELIST": "localhost"}) == "localhost"
    with pytest.raises(SystemExit, match=r"'no-such-node\.invalid' does not resolve.*set RENDEZVOUS_ADDR in the site"):
        _master_addr({"SLURM_JOB_NODELIST": "no-such-node.invalid,other"})


def test_rendezvous_host_falls_back_to_node_address(tmp_path, monkeypatch):
    """A node name that does not resolve would hang torch forever; Slurm's NodeAddr is used where scontrol is."""
    from moco.runtime.distributed import _master_addr

    _no_scontrol(tmp_path, monkeypatch, '#!/bin/sh\necho "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=x"\n')
    assert _master_addr({"SLURM_JOB_NODELIST": "no-such-node[1-2].invalid"}) == "10.1.2.3"


def test_a_task_whose_peers_never_come_stops_at_the_rendezvous_timeout(subprocess_env):
    """Rank 0 of 2 alone: it stops after MOCO_RENDEZVOUS_TIMEOUT with a sentence, not after half an hour."""
    env = dict(subprocess_env, SLURM_JOB_ID="4243", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", RENDEZVOUS_ADDR="127.0.0.1",
               RENDEZVOUS_PORT=str(_free_port()), MOCO_RENDEZVOUS_TIMEOUT="2", MOCO_DEVICE="cpu")
    started = time.monotonic()
    code = "from moco.runtime.distributed import init_distributed; init_distributed()"
    result = subprocess.run([sys.executable, "-c", code],
                            env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - started < 60, result.stderr[-2000:]
    assert "error: rank 0: the 2 tasks did not all meet at 127.0.0.1:" in result.stderr
    assert "within 2 s (MOCO_RENDEZVOUS_TIMEOUT)" in result.stderr


@pytest.mark.parametrize("value", ["ten", "0", "-5"])
def test_rendezvous_timeout_must_be_seconds(value):
    from moco.runtime.distributed import rendezvous_timeout

    assert rendezvous_timeout({}).total_seconds() == 600
    with pytest.raises(SystemExit, match=f"MOCO_RENDEZVOUS_TIMEOUT='{value}': a number of seconds"):
        rendezvous_timeout({"MOCO_RENDEZVOUS_TIMEOUT": value})


def test_slurm_rendezvous_is_the_jobs_whatever_the_submitting_shell_left():
    """sbatch exports the submitting shell: a MASTER_ADDR=localhost from a torchrun tutorial would keep a 2-node job
    waiting out the rendezvous timeout, a fixed MASTER_PORT make two jobs on one node collide. Only RENDEZVOUS_ADDR
    and RENDEZVOUS_PORT (the batch script's, or the site config's) count."""
    from moco.runtime.distributed import slurm_rendezvous

    job = {"SLURM_JOB_ID": "4244", "SLURM_JOB_NODELIST": "localhost,n2", "MASTER_ADDR": "leftover.invalid",
           "MASTER_PORT": "29500"}
    assert slurm_rendezvous(job) == ("localhost", slurm_port("4244"))
    assert slurm_rendezvous({**job, "RENDEZVOUS_ADDR": "10.1.2.3", "RENDEZVOUS_PORT": "29400"}) == ("10.1.2.3", 29400)
    with pytest.raises(SystemExit, match="RENDEZVOUS_PORT='x': a port number"):
        slurm_rendezvous({**job, "RENDEZVOUS_PORT": "x"})


def _launch(launcher: str, local_rank: int = 0):
    from moco.runtime.distributed import Launch

    return Launch(launcher, local_rank, {"single": 1}.get(launcher, 8), local_rank)


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("launcher, local_rank, env, visible, refusal", [
    # What run_tasks started where no variable counted the GPUs: one task on a node of 4.
    ("single", 0, {**SLURM_STEP, "SLURM_GPUS_ON_NODE": "4"}, 4, r"1 Slurm task\(s\) on \S+ see 4 GPUs and use one "
     r"each, so 3 would sit idle: run one task per GPU \(srun --ntasks-per-node=4; in the job scripts TASKS_PER_NODE"
     r" unset or 4\)"),
    ("slurm", 1, {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4,2"}, 4, r"2 Slurm task\(s\) on .* 2 would sit idle"),
    # Two tasks on one GPU: local ranks 0 and 1 both map to cuda:0; rank 1 knows without the tasks' count.
    ("slurm", 0, {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_GPUS_ON_NODE": "1"}, 1,
     r"2 Slurm tasks on \S+ see 1 GPU\(s\), so local ranks 0 and 1 would both take cuda:0: run one task per GPU "
     r"\(srun --ntasks-per-node=1; in the job scripts TASKS_PER_NODE unset or 1\)"),
    ("slurm", 5, {"SLURM_JOB_ID": "7"}, 4, r"6 Slurm tasks on \S+ see 4 GPU\(s\), so local ranks 0 and 4"),
    ("slurm", 3, {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_GPUS_ON_NODE": "4"}, 4, None),
    ("single", 0, {**SLURM_STEP, "SLURM_GPUS_ON_NODE": "1"}, 1, None),
    # --gpus-per-task=1: each task sees its own GPU of the node's 4.
    ("slurm", 2, {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_GPUS_ON_NODE": "4"}, 1, None),
    ("slurm", 2, {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_GPUS": "0,1,2,3"}, 1, None),
    # A workstation, and torchrun (under Slurm or not): the user's layout.
    ("single", 0, {}, 4, None),
    ("torchrun", 0, {**SLURM_STEP, "SLURM_GPUS_ON_NODE": "4"}, 4, None),
], ids=["one-task-4-gpus", "2-of-4-tasks", "2-tasks-1-gpu", "6-tasks-4-gpus-unknown-count", "4-tasks-4-gpus",
        "1-task-1-gpu", "gpus-per-task", "gpus-per-task-job-gpus", "workstation", "torchrun"])
def test_a_slurm_task_layout_that_idles_or_shares_gpus_is_refused(launcher, local_rank, env, visible, refusal):
    from moco.runtime.distributed import task_layout_problem

    problem = task_layout_problem(_launch(launcher, local_rank), env, visible)
    assert problem is None if refusal is None else re.match(refusal, problem), problem


def _fake_gpus(monkeypatch, count: int):
    import moco.runtime.distributed

    monkeypatch.setattr(moco.runtime.distributed, "select_device", lambda device, local_rank: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_init_distributed_refuses_one_slurm_task_on_several_gpus_before_any_rendezvous(monkeypatch):
    """Outside Slurm, one process on a 4-GPU workstation is fine; as a Slurm task it stops with one sentence."""
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    _fake_gpus(monkeypatch, 4)
    assert init_distributed().device == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(SystemExit, match=r"^error: 1 Slurm task\(s\) on \S+ see 4 GPUs .*TASKS_PER_NODE"):
        init_distributed()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed().launcher == "torchrun"


def _broken_transport(tensor):
    raise torch.distributed.DistBackendError("NCCL error in: x\nmore lines")


@pytest.mark.parametrize("reduce, message", [
    (lambda tensor: None, r"the first all_reduce across all tasks summed to 1, not 2"),
    (_broken_transport, r"the first all_reduce across all tasks failed \(DistBackendError: NCCL error in: x\)"),
    (lambda tensor: tensor.mul_(2), None),
], ids=["a-task-missing", "transport-error", "every-task"])
def test_the_first_all_reduce_must_reach_every_task(monkeypatch, reduce, message):
    """Right after the process group forms, before any data: a sum short of the world size, or a failure, stops
    the run with one sentence naming this host and device. (The real collective runs in every gloo test above.)"""
    import moco.runtime.distributed

    monkeypatch.setattr(moco.runtime.distributed.dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(moco.runtime.distributed.dist, "all_reduce", reduce)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MOCO_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    if message is None:
        assert init_distributed().world_size == 2
        return
    with pytest.raises(SystemExit) as stop:
        init_distributed()
    assert re.fullmatch(rf"error: rank 1 of 2 on {re.escape(socket.gethostname())}, cpu: {message}; NCCL_DEBUG=INFO "
                        r"in the site config logs the transports tried", str(stop.value.code)), stop.value.code
