"""Jobs with data-loading workers under Slurm's stop signals, on the local Slurm of test_slurm.py.

Slurm signals every process of a job step, the workers included: the time-limit warning (here delivered with
scancel --batch, as --signal=B:USR1 would, and passed on to the step by the batch script) and scontrol requeue's
SIGTERM. Each job gets both, so it runs three times (Restarts=2), under fork (Python 3.11's default start method)
and forkserver (3.14's, set here by a sitecustomize on the job's PYTHONPATH).
"""
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_logs import moco_resume_point, stage_resume_point, stop_point
from test_slurm import ONE_TASK, SLOWER_MOCO, log_of, sbatch, wait_done, wait_for

from demo.recipe import warmup_factor
from moco.runtime import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

METHODS = ["fork", "forkserver"]
FAILURES = ("killed by signal", "exited unexpectedly", "Traceback")
# Stage-prefixed knobs only. 64-pixel crops: steps slow enough (~0.3 s) for the signals to land mid-run.
MOCO = {**SLOWER_MOCO, "MOCO_ARCH": "resnet18", "MOCO_EPOCHS": "3", "MOCO_WORKERS": "2"}
R1_LR = 0.01


def _env(job_env, tmp_path, method: str) -> dict:
    env = {**job_env, **MOCO, "R1_WORKERS": "2"}
    if method == "forkserver":
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import multiprocessing\n"
                                               "multiprocessing.set_start_method('forkserver')\n")
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    return env


def _warn(env):
    return lambda job: subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)


def _requeue(env):
    return lambda job: subprocess.run(["scontrol", "requeue", job], env=env, check=True)


def _has_forkserver(job_id: str) -> bool:
    """Whether a process of this job is multiprocessing's fork server."""
    for proc in Path("/proc").iterdir():
        try:
            if (b"multiprocessing.forkserver" in (proc / "cmdline").read_bytes()
                    and f"SLURM_JOB_ID={job_id}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                return True
        except (NotADirectoryError, FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return False


def _interrupted_twice(env, script: str, interruptions) -> tuple[dict, str, bool, list[float]]:
    """Submit; for each (regex, interrupt): wait until the job's current run logs the regex, then interrupt it.
    Returns the final job info, its log, whether a fork server served the first run, and the seconds from each
    interruption to the task's exit with status 75."""
    job_id = sbatch(env, f"{script}.slurm", *ONE_TASK)

    def run_log(restart: int) -> str:
        log = log_of(env, script, job_id)
        start = log.find(f"restart {restart},")
        return log[start:] if start >= 0 else ""

    forkserver, stops = False, []
    for restart, (progress, interrupt) in enumerate(interruptions):
        wait_for(lambda: re.search(progress, run_log(restart)), 300, f"{progress} in run {restart}", interval=0.2)
        forkserver |= restart == 0 and _has_forkserver(job_id)
        interrupt(job_id)
        start = time.monotonic()
        wait_for(lambda: "exiting with status 75" in run_log(restart), 120, f"the stop of run {restart}",
                 interval=0.2)
        stops.append(time.monotonic() - start)
    return wait_done(env, job_id, timeout=600), log_of(env, script, job_id), forkserver, stops


def _moco_losses(log: str) -> list[tuple[str, str, str]]:
    return re.findall(r"epoch (\d+) step (\d+)/8 loss ([\d.]+)", log)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Runs shared by this module's tests, made by the first that needs them in a folder of the module's (a
    test's own tmp_path goes when it passes)."""
    return {"run": tmp_path_factory.mktemp("uninterrupted")}


def _uninterrupted_pretraining(job_env, tmp_path, cache: dict) -> tuple[list, Path]:
    """Losses of every step of the same pretraining run without interruption, and its final checkpoint."""
    if "moco" not in cache:
        env = {**_env(job_env, tmp_path, "fork"), "RUN_DIR": str(cache["run"])}
        job_id = sbatch(env, "moco_v2.slurm", *ONE_TASK)
        info, log = wait_done(env, job_id), log_of(env, "moco_v2", job_id)
        assert info["JobState"] == "COMPLETED", log
        cache["moco"] = _moco_losses(log), cache["run"] / "moco" / checkpoint.LAST
    return cache["moco"]


@pytest.mark.parametrize("method", METHODS)
def test_pretraining_with_workers_stops_at_a_step_on_both_signals(job_env, tmp_path, uninterrupted, method):
    reference, _ = _uninterrupted_pretraining(job_env, tmp_path, uninterrupted)
    assert len(reference) == 24, reference  # 3 epochs of 8 steps, each logged once
    env = _env(job_env, tmp_path, method)
    info, log, forkserver, stops = _interrupted_twice(env, "moco_v2", [
        (r"epoch 0 step [2-6]/8", _warn(env)),
        (r"resumed from[\s\S]*step \d+/8 [\s\S]*step \d+/8 ", _requeue(env)),  # two steps after the resume
    ])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log
    assert forkserver == (method == "forkserver")
    assert not any(failure in log for failure in FAILURES), log
    warned = log.index("stopped by SIGUSR1")
    assert moco_resume_point(log) == stop_point(log, "SIGUSR1", 8), log
    assert moco_resume_point(log[log.index("stopped by SIGTERM"):]) == stop_point(log, "SIGTERM", 8) > \
        stop_point(log, "SIGUSR1", 8), log[warned:]
    # Every step trained once, to the same loss as without the interruptions (to the 4 decimals logged).
    assert _moco_losses(log) == reference
    run = Path(env["RUN_DIR"]) / "moco"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1, 2, 3]
    # The batch shell: it requeued after the warning; it only logged the requeue's SIGTERM, which the tasks got too.
    order = ["time limit near", "stopped by SIGUSR1 at step", "checkpoint saved: requeueing job", "restart 1,",
             "SIGTERM (preemption, requeue or cancel): the tasks received it too", "stopped by SIGTERM at step",
             "restart 2,", "epoch 3/3 done"]
    positions = [log.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), log
    for path in run.glob("checkpoint_*.pth.tar"):  # every file complete and readable, no temporary one left
        assert checkpoint.load(path)["epoch"] in (1, 2, 3)
    assert not list(run.glob(".*tmp*"))
    print(f"pretraining, {method}: stopped {stops[0]:.1f} s after the warning, {stops[1]:.1f} s after the requeue")


@pytest.mark.parametrize("method", METHODS)
def test_r1_with_workers_stops_mid_epoch_and_during_validation(job_env, tmp_path, uninterrupted, method):
    """Requeued mid-epoch, then warned during validation: the second run checkpoints no more (the epoch's training
    is saved before its validation), and the third only validates that epoch before training the next.
    Validation runs on the 48 training images one at a time, to last long enough for the warning to land.
    (The losses are not compared with an uninterrupted run: the detector's random flips and box sampling draw
    from the processes' global generators, which a resumed run does not restore.)"""
    _, backbone = _uninterrupted_pretraining(job_env, tmp_path, uninterrupted)
    env = {**_env(job_env, tmp_path, method), "R1_BACKBONE": str(backbone), "R1_EPOCHS": "2", "R1_LR": str(R1_LR),
           "FPN_EXTRA_ARGS": job_env["FPN_EXTRA_ARGS"] + " --val-split training --val-batch-size 1"}
    info, log, forkserver, stops = _interrupted_twice(env, "demo_mocov2_fpn_r1", [
        (r"epoch 0 step [2-8]/12", _requeue(env)),
        (r"stage r1 \(resume from[\s\S]*epoch 1/2: validation on 48 images", _warn(env)),
    ])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log
    assert forkserver == (method == "forkserver")
    assert not any(failure in log for failure in FAILURES), log
    assert stage_resume_point(log, "r1") == stop_point(log, "SIGTERM", 12) >= (0, 2), log
    warned = log.index("time limit near")
    assert re.search(r"inference stopped at batch \d+ of 48[\s\S]*stopped by SIGUSR1 at step 12: checkpoint saved",
                     log[warned:]), log[warned:]
    assert stage_resume_point(log[warned:], "r1") == (0, 12), log[warned:]
    # Each step trained once, at the warm-up's lr for its iteration: the schedule resumed where it stopped.
    steps = re.findall(r"epoch (\d+) step (\d+)/12 loss [\d.]+ lr (\S+)", log)
    assert steps == [(str(e), str(s), f"{R1_LR * warmup_factor(12 * e + s + 1, 12):.3g}")
                     for e in range(2) for s in range(12)], log
    stage = Path(env["RUN_DIR"]) / "fpn" / "r1"
    assert [json.loads(line)["epoch"] for line in (stage / "metrics.jsonl").open()] == [1, 2]
    final = checkpoint.load(stage / checkpoint.LAST)
    assert (final["epoch"], final["step"], final["lr_scheduler"]["last_epoch"]) == (2, 0, 24)
    print(f"r1, {method}: stopped {stops[0]:.1f} s after the requeue, {stops[1]:.1f} s after the warning during "
          f"validation")
