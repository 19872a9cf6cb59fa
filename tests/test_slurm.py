"""The job scripts of slurm/ on a real Slurm (a private two-node cluster on this machine, see conftest).

Each test writes into its own directories; jobs are submitted the way users do, from slurm/ or the repository,
with knobs in the environment and resource options on the sbatch line.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moco.runtime import checkpoint
from moco.runtime.distributed import slurm_port

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["moco_v2", "demo_mocov2_fpn_r1", "demo_mocov2_fpn_r2", "demo_mocov2_fpn_r3", "eval_mocov2_fpn"]
# Tiny-data settings: the knobs users set the same way (sbatch --export or the environment of submit.sh).
TINY_MOCO = {"MOCO_ARCH": "resnet18", "MOCO_BATCH_SIZE": "32",
             "MOCO_EXTRA_ARGS": "--image-size 32 --moco-k 256 --bn-splits 4 -p 1"}
TINY_FPN = {"FPN_BATCH_SIZE": "4", "FPN_EXTRA_ARGS": "--min-size 160 --max-size 256 --rois-per-image 32 "
            "--fpn-channels 64 -p 1 --norm sync --trainable-layers 5"}
ONE_TASK = ["--gres=gpu:1"]  # one task (on the CPU): the fake GPUs only steer the task count


def sbatch(env, script, *options, cwd=ROOT / "slurm", slurm_file_in_cwd=False) -> str:
    """Slurm's own file goes to the test's LOG_DIR, not into the repository where the scripts' --output puts it,
    unless ``slurm_file_in_cwd``."""
    if not slurm_file_in_cwd:  # Slurm fails a job whose --output folder is missing
        Path(env["LOG_DIR"]).mkdir(parents=True, exist_ok=True)
        options = (f"--output={env['LOG_DIR']}/%x_%j.slurm.out", *options)
    out = subprocess.run(["sbatch", "--parsable", *options, script], env=env, cwd=cwd, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return out.strip().split(";")[0]


def job_info(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_done(env, job_id, timeout=300) -> dict:
    return wait_for(lambda: (info := job_info(env, job_id))["JobState"] in FINAL and info, timeout,
                    f"job {job_id} to end")


def log_of(env, name, job_id) -> str:
    path = Path(env["LOG_DIR"]) / f"{name}_{job_id}.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_test_only_accepts_every_script_as_written(slurm_env, script):
    """The real #SBATCH lines (partitions of the example config, 4/2/1 GPUs, requeue, signal), from slurm/ and
    from the repository root."""
    for cwd, path in ((ROOT / "slurm", f"{script}.slurm"), (ROOT, f"slurm/{script}.slurm")):
        result = subprocess.run(["sbatch", "--test-only", path], env=slurm_env, cwd=cwd, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert re.search(r"Job \d+ to start at .* on nodes n\d in partition v100-\d", result.stderr), result.stderr


def test_full_pipeline_of_the_five_scripts_on_tiny_data(job_env, tiny_data, tmp_path):
    """make pipeline: pretrain -> r1 -> r2 -> r3 -> eval as an afterok chain. The unlabeled images come as a
    squashfs image that the pretraining job unpacks, as on the course's cluster."""
    image = tmp_path / "unlabeled_224.sqsh"
    subprocess.run(["mksquashfs", str(tiny_data / "train"), str(image), "-no-progress"], check=True,
                   capture_output=True)
    env = {**job_env, "UNLABELED_SQSH": str(image), "UNLABELED_DIR": str(tmp_path / "scratch" / "train"),
           "MOCO_EPOCHS": "2", "R1_EPOCHS": "2", "R1_LR": "0.01", "R2_EPOCHS": "3", "R3_EPOCHS": "4",
           "PIPELINE": " ".join(SCRIPTS)}
    start = time.monotonic()
    out = subprocess.run(["make", "--no-print-directory", "pipeline", "SBATCH_ARGS=--gres=gpu:1"], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    ids = dict(line.split() for line in out.splitlines() if line.split()[0] in SCRIPTS)
    assert list(ids) == SCRIPTS, out
    wait_done(env, ids["eval_mocov2_fpn"], timeout=900)
    states = {name: job_info(env, job_id)["JobState"] for name, job_id in ids.items()}
    assert states == dict.fromkeys(SCRIPTS, "COMPLETED"), {n: log_of(env, n, ids[n])[-2000:] for n in SCRIPTS}

    assert sorted(p.name for p in (tmp_path / "scratch" / "train" / "unlabeled").iterdir())[:2] == ["0.PNG", "1.PNG"]
    run = tmp_path / "run"
    assert checkpoint.load(run / "moco" / checkpoint.LAST)["epoch"] == 2
    for stage, end in (("r1", 2), ("r2", 3), ("r3", 4)):
        assert checkpoint.load(run / "fpn" / stage / checkpoint.LAST)["epoch"] == end
    evaluation = log_of(env, "eval_mocov2_fpn", ids["eval_mocov2_fpn"])
    assert evaluation.count("Average Precision  (AP) @[ IoU=") == 6, evaluation
    assert evaluation.count("Average Recall     (AR) @[ IoU=") == 6
    assert "cup or mug" in evaluation
    # The same numbers as r3's last validation: same weights, same batches (4 images), same precision.
    written = json.loads((run / "fpn" / "r3" / "metrics_validation.json").read_text())
    assert written["stats"] == checkpoint.load(run / "fpn" / "r3" / checkpoint.LAST)["val"]
    print(f"pipeline of 5 jobs: {time.monotonic() - start:.0f} s")


def _container_without_slurm(tmp_path) -> str:
    """A CONTAINER prefix whose tasks see none of Slurm's commands (most images have none): PATH is an empty
    folder (TASK_PYTHON is an absolute path). It notes what the task could find of scontrol."""
    (tmp_path / "empty").mkdir()
    wrapper = tmp_path / "container"
    wrapper.write_text(f'#!/bin/bash\nexport PATH={tmp_path / "empty"}\n'
                       f'echo "scontrol: $(command -v scontrol || echo none)" >>{tmp_path / "seen"}\nexec "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def port_29500_taken():
    """Another job's rendezvous on this node, on the port a torchrun tutorial leaves in MASTER_PORT."""
    with socket.socket() as taken:
        try:
            taken.bind(("", 29500))
            taken.listen()
        except OSError:  # taken already, by something else
            pass
        yield


@pytest.mark.parametrize("options, nodes, container", [(["--gres=gpu:2"], 1, False),
                                                       (["--nodes=2", "--gres=gpu:1"], 2, False),
                                                       (["--nodes=2", "--gres=gpu:1"], 2, True)],
                         ids=["2-tasks-1-node", "2-nodes", "2-nodes-container-without-slurm"])
def test_ddp_through_srun(job_env, tiny_data, tmp_path, port_29500_taken, options, nodes, container):
    """One task per (fake) GPU on every node, gloo DDP. The node names do not resolve: the batch shell finds the
    first node's NodeAddr on the host, so that tasks in a container without Slurm's commands meet there too. The
    submitting shell left MASTER_ADDR=localhost MASTER_PORT=29500 RANK=0 WORLD_SIZE=1 (sbatch exports them) and
    another process holds that port: the job meets at its own address and port instead, with srun's ranks. The
    preflight runs on every node. On 2 nodes the data comes as a squashfs image that each node unpacks into
    NODE_SCRATCH (the local cluster's nodes share one filesystem, so the second may find the first's copy).
    Submitted from the repository root this time."""
    env = {**job_env, "MOCO_EPOCHS": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if container:
        env["CONTAINER"] = _container_without_slurm(tmp_path)
    elif nodes == 2:
        image = tmp_path / "unlabeled.sqsh"
        subprocess.run(["mksquashfs", str(tiny_data / "train"), str(image), "-no-progress"], check=True,
                       capture_output=True)
        env.update(NODE_SCRATCH=str(tmp_path / "node-local"), UNLABELED_SQSH=str(image),
                   UNLABELED_DIR=str(tmp_path / "node-local" / "train"))
    job_id = sbatch(env, "slurm/moco_v2.slurm", *options, cwd=ROOT)
    info = wait_done(env, job_id)
    log = log_of(env, "moco_v2", job_id)
    assert info["JobState"] == "COMPLETED", log
    srun = (rf"srun: {nodes} node\(s\) x {2 // nodes} task\(s\), \d+ CPU\(s\) each, rendezvous at "
            rf"127\.0\.0\.1:{slurm_port(job_id)}: ")
    assert re.search(srun, log), log
    assert "launch slurm: rank 0 of 2" in log
    # The doctor once a node: as the step's tasks 0 and 1 on 2 nodes.
    assert sorted(int(rank) for rank in re.findall(rf"doctor: launch: \w+, rank (\d) of {nodes},", log)) == \
        list(range(nodes)), log
    if container:  # the preflight, the data check of a 2-node job, and both tasks ran inside it
        assert (tmp_path / "seen").read_text().splitlines() == ["scontrol: none"] * 6
    elif nodes == 2:
        for node in ("n1", "n2"):
            assert re.search(rf"on {node}: (unpacking {image} into {env['UNLABELED_DIR']}|{env['UNLABELED_DIR']} "
                             rf"is already unpacked)\n", log), log
    with pytest.raises(socket.gaierror):  # so the tasks met at n1's NodeAddr
        socket.getaddrinfo("n1", None)
    assert info["NodeList"] == "n[1-2]" if nodes == 2 else info["NodeList"] in ("n1", "n2")
    assert checkpoint.load(Path(env["RUN_DIR"]) / "moco" / checkpoint.LAST)["epoch"] == 1


def _interrupt_then_finish(env, script, interrupt, progress: str, timeout=600, **submit) -> tuple[dict, str]:
    job_id = sbatch(env, f"{script}.slurm", *ONE_TASK, **submit)
    wait_for(lambda: re.search(progress, log_of(env, script, job_id)), 300, progress, interval=0.2)
    interrupt(job_id)
    info = wait_done(env, job_id, timeout)
    return info, log_of(env, script, job_id)


# 64-pixel crops: steps slow enough (~0.3 s) that the run is still going when the interruption lands. Where it
# lands depends on the host: the tests read it from the log. The requeue and the time-limit warning during training
# and validation, with data-loading workers, are tested in test_slurm_workers.py.
SLOWER_MOCO = {"MOCO_EXTRA_ARGS": TINY_MOCO["MOCO_EXTRA_ARGS"].replace("32", "64")}


def test_failing_stage_cancels_the_stages_after_it(job_env, tmp_path):
    env = {**job_env, "R1_BACKBONE": str(tmp_path / "missing.pth.tar")}
    out = subprocess.run([str(ROOT / "slurm" / "submit.sh"), *SCRIPTS[1:], "--", *ONE_TASK], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    ids = dict(line.split() for line in out.splitlines())
    assert wait_done(env, ids["demo_mocov2_fpn_r1"])["JobState"] == "FAILED"
    for name in SCRIPTS[2:]:
        assert wait_done(env, ids[name], timeout=60)["JobState"] == "CANCELLED", name
    log = log_of(env, "demo_mocov2_fpn_r1", ids["demo_mocov2_fpn_r1"])
    assert f"{tmp_path / 'missing.pth.tar'}: no such checkpoint" in log
    assert not any(log_of(env, name, ids[name]) for name in SCRIPTS[2:])  # never started


def test_slurm_up_and_down_stop_only_their_own_daemons(tmp_path):
    """make slurm-up / slurm-down: a process that merely looks like a Slurm daemon survives `down`."""
    decoy = subprocess.Popen(["bash", "-c", "exec -a slurmd sleep 300"])
    cli = [sys.executable, str(ROOT / "slurm" / "local_cluster.py")]
    where = ["--dir", str(tmp_path / "cluster"), "--nodes", "1"]
    try:
        up = subprocess.run([*cli, "up", *where], check=True, capture_output=True, text=True, timeout=120).stdout
        assert f"source {tmp_path / 'cluster' / 'env.sh'}" in up
        pids = json.loads((tmp_path / "cluster" / "pids.json").read_text())
        assert set(pids) == {"munged", "slurmctld", "slurmd-n1"}
        conf = {"SLURM_CONF": str(tmp_path / "cluster" / "slurm.conf")}
        job = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 300"], env={**os.environ, **conf},
                             check=True, capture_output=True, text=True, timeout=30).stdout.strip()
        subprocess.run([*cli, "down", *where], check=True, capture_output=True, timeout=120)
        for pid in pids.values():  # gone, or a zombie waiting for an init that does not reap
            assert not os.path.exists(f"/proc/{pid}") or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
        assert decoy.poll() is None
        assert job and not (tmp_path / "cluster" / "pids.json").exists()
        again = subprocess.run([*cli, "down", *where], check=True, capture_output=True, text=True, timeout=60)
        assert "no Slurm cluster running" in again.stdout
    finally:
        decoy.send_signal(signal.SIGTERM)
        decoy.wait()


def test_job_given_gpus_that_cuda_cannot_use_stops_at_the_preflight(job_env, tmp_path):
    """The fake GPUs with the device left to auto: the job ends at once with the doctor's sentence, before its
    data is staged (the squashfs image does not even exist) or any task starts."""
    env = {**job_env, "MOCO_DEVICE": "auto", "UNLABELED_SQSH": str(tmp_path / "unlabeled.sqsh"),
           "UNLABELED_DIR": str(tmp_path / "unlabeled")}
    job = sbatch(env, "moco_v2.slurm", *ONE_TASK)
    info = wait_done(env, job, timeout=120)
    log = log_of(env, "moco_v2", job)
    assert info["JobState"] == "FAILED", log
    assert re.search(r"doctor: error: this job was given GPUs \(SLURM_GPUS_ON_NODE=1[^)]*\) but CUDA cannot use "
                     r"them: ", log), log
    assert "preflight failed" in log and "--device cpu or MOCO_DEVICE=cpu" in log
    assert "unsquashfs" not in log and "unlabeled.sqsh" not in log and "tasks per node" not in log
    assert not (tmp_path / "unlabeled").exists() and not Path(env["RUN_DIR"]).exists()


def test_time_limit_not_above_twice_the_warning_lead_is_refused(job_env):
    """--signal=B:USR1@300 with --time=4:00 would warn the job at once after every start: it is refused at once."""
    job = sbatch(job_env, "moco_v2.slurm", *ONE_TASK, "--time=00:04:00")
    info = wait_done(job_env, job, timeout=120)
    log = log_of(job_env, "moco_v2", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "error: the time limit (240 s) is too short for this job: it is warned 300 s before the limit" in log
    assert "Give --time of at least 10 minutes" in log and "srun:" not in log


def test_requeues_stop_at_max_requeues_with_the_checkpoint_kept(job_env):
    """MAX_REQUEUES=0: the first warning checkpoints, and the job ends there (FAILED, exit 75, dependents
    cancelled) with a message saying why and how to go on, instead of requeueing."""
    env = {**job_env, **SLOWER_MOCO, "MOCO_EPOCHS": "3", "MAX_REQUEUES": "0"}
    info, log = _interrupt_then_finish(
        env, "moco_v2",
        lambda job: subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True),
        r"epoch 1 step [2-5]/8", timeout=300)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", log
    assert "stopped by SIGUSR1 at step" in log and "requeueing job" not in log
    assert re.search(r"error: checkpoint saved, but job \d+ has already run 1 time\(s\) \(MAX_REQUEUES=0\): not "
                     r"requeueing it again\. Its checkpoint is kept: submit the same script again", log), log
    assert checkpoint.load(Path(env["RUN_DIR"]) / "moco" / checkpoint.LAST)["epoch"] >= 1


def test_slurms_own_messages_are_kept_beside_the_log(job_env):
    """A plain sbatch: Slurm writes its file beside where sbatch ran; the log folder links to it, and Slurm's own
    line for a cancelled job is there."""
    env = {**job_env, **SLOWER_MOCO, "MOCO_EPOCHS": "3"}
    info, log = _interrupt_then_finish(
        env, "moco_v2", lambda job: subprocess.run(["scancel", job], env=env, check=True), r"epoch 1 step",
        slurm_file_in_cwd=True)
    job = info["JobId"]
    link = Path(env["LOG_DIR"]) / f"moco_v2_{job}.slurm.out"
    assert info["JobState"] == "CANCELLED" and f"Slurm's own messages for this job: {link}" in log, log
    assert link.resolve() == ROOT / "slurm" / f"moco_v2_{job}.slurm.out"
    try:
        assert re.search(rf"\*\*\* JOB {job} ON n\d CANCELLED AT ", wait_for(link.read_text, 30, "Slurm's line"))
    finally:
        link.resolve().unlink()


def test_a_job_that_cannot_find_the_repository_says_so_in_slurms_file(job_env, tmp_path):
    """Submitted from outside the repository: the job fails before its own log exists, and says why in the
    file Slurm writes where sbatch ran."""
    job = sbatch(job_env, str(ROOT / "slurm" / "moco_v2.slurm"), *ONE_TASK, cwd=tmp_path,
                 slurm_file_in_cwd=True)
    assert wait_done(job_env, job, timeout=60)["JobState"] == "FAILED"
    text = (tmp_path / f"moco_v2_{job}.slurm.out").read_text()
    assert f"no slurm/common.sh in or above {tmp_path}: submit from inside the repository, or set PIPELINE_REPO" in text


def test_a_second_job_on_a_running_stage_is_refused_and_another_recipe_is_not_continued(job_env):
    """Two pretraining jobs in one run directory: the second stops at once, naming the first, which goes on. Then a
    'real run' asking for more epochs in the directory of this 'smoke run' refuses its checkpoint."""
    env = {**job_env, **SLOWER_MOCO, "MOCO_EPOCHS": "3"}
    run = Path(env["RUN_DIR"]) / "moco"
    first = sbatch(env, "moco_v2.slurm", *ONE_TASK)
    try:
        wait_for(lambda: re.search(r"epoch \d+ step", log_of(env, "moco_v2", first)), 300, "training", interval=0.2)
        second = sbatch(env, "moco_v2.slurm", *ONE_TASK)
        assert wait_done(env, second, timeout=120)["JobState"] == "FAILED"
        assert re.search(rf"error: {run} is in use by another run \(host \S+, pid \d+, Slurm job {first}, since ",
                         log_of(env, "moco_v2", second)), log_of(env, "moco_v2", second)
        assert job_info(env, first)["JobState"] == "RUNNING"
    finally:
        subprocess.run(["scancel", first], env=env, check=True)
    wait_done(env, first, timeout=120)
    wait_for(lambda: (run / checkpoint.LAST).is_file(), 60, "the first job's checkpoint")
    third = sbatch({**env, "MOCO_EPOCHS": "100"}, "moco_v2.slurm", *ONE_TASK)
    assert wait_done(env, third, timeout=120)["JobState"] == "FAILED"
    assert "written by a run with another recipe: --epochs 100 (checkpoint: 3)" in log_of(env, "moco_v2", third)
