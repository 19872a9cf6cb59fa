"""slurm/launch.py, the submitit launcher: the same config, knobs and command lines as the job scripts, and a real
chain of jobs on the private Slurm of conftest (submitit calls sbatch in this process: the environment is
os.environ, set through monkeypatch)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_logs import moco_resume_point, stop_point
from test_slurm_workers import _has_forkserver

from moco.runtime import checkpoint
from slurm import launch

ROOT = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# r1 on a 1-epoch backbone diverges with the recipe's lr and frozen BatchNorm (as in test_demo_train), and bf16
# autocast on this CPU is 5x slower than fp32.
TINY = {"MOCO_ARCH": "resnet18", "MOCO_BATCH_SIZE": "32",
        "MOCO_EXTRA_ARGS": "--image-size 32 --moco-k 256 --bn-splits 4 -p 0",
        "MOCO_EPOCHS": "1", "FPN_BATCH_SIZE": "4", "R1_EPOCHS": "1", "R1_LR": "0.01", "ALL_WORKERS": "0",
        "FPN_EXTRA_ARGS": "--min-size 160 --max-size 256 --rois-per-image 32 --fpn-channels 64 -p 0 --val-batch-size 8 "
                          "--norm sync --trainable-layers 5 --precision off"}


def _set_environ(monkeypatch, env: dict) -> None:
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_knob_resolution_order_matches_common_sh():
    """Stage, then group, then ALL_; a bare name (a leftover `export EPOCHS=1`) is never read; set-but-empty counts."""
    cfg = {"R1_EPOCHS": "2", "FPN_EPOCHS": "5", "EPOCHS": "1", "FPN_LR": "", "ALL_LR": "0.1", "LR": "7",
           "MOCO_WORKERS": "1", "ALL_WORKERS": "3", "WORKERS": "0", "EVAL_SPLIT": "", "ARCH": "resnet18"}
    cases = [("R1", "FPN", "EPOCHS", "23", "2"), ("R2", "FPN", "EPOCHS", "27", "5"),
             ("MOCO", "", "EPOCHS", "100", "100"),
             ("R3", "FPN", "LR", "", ""), ("MOCO", "", "LR", "0.015", "0.1"), ("MOCO", "", "WORKERS", "5", "1"),
             ("R2", "FPN", "WORKERS", "4", "3"), ("EVAL", "", "SPLIT", "validation", ""),
             ("MOCO", "", "ARCH", "resnet50", "resnet50")]
    script = 'source slurm/common.sh; STAGE=$1 GROUP=$2; knob "$3" "$4" >/dev/null; printf %s "${!3}"'
    for stage, group, name, default, expected in cases:
        shell = subprocess.run(["bash", "-c", script, "knob", stage, group, name, default], cwd=ROOT, check=True,
                               env={"PATH": os.environ["PATH"], **cfg}, capture_output=True, text=True).stdout
        assert launch.knob(cfg, stage, group, name, default) == shell == expected, (stage, group, name)


def test_command_lines_match_the_job_scripts(monkeypatch, tmp_path):
    """Each .slurm script run by bash with a fake srun that records its command and runs it: the launcher builds
    the same argv from the same site config and knobs. A fake python records the preflight, which comes first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" >"$SRUN_RECORD"\necho srun >>"$CALLS"\n'
                                  'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "python").write_text('#!/bin/bash\necho "python $1 $2 ${3:0:2}" >>"$CALLS"\n')
    for tool in ("srun", "python"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SITE_CONF": str(ROOT / "slurm" / "site.conf.example"),
           "TASK_PYTHON": str(bin_dir / "python"), "CALLS": str(tmp_path / "calls"), "LOG_DIR": str(tmp_path / "logs"),
           "RUN_DIR": str(tmp_path / "run dir"),
           "SLURM_SUBMIT_DIR": str(ROOT / "slurm"), "SLURM_JOB_ID": "7", "SRUN_RECORD": str(tmp_path / "argv"),
           "R1_EPOCHS": "2", "FPN_LR": "0.01", "R3_LR": "", "FPN_EXTRA_ARGS": "--min-size 160  -p 0",
           "ALL_WORKERS": "3", "FPN_PROTOCOL": "original",  # r1 passes it on; r2 and r3 keep r1's
           # Leftovers of a user's shell, none of them the jobs': they change nothing.
           "EPOCHS": "1", "ARCH": "resnet18", "PYTHON": "/usr/bin/false", "REPO": "/nonexistent"}
    _set_environ(monkeypatch, env)
    cfg = launch.read_config()
    assert cfg["PRETRAIN_PARTITION"] == "v100-4" and cfg["RUN_DIR"] == env["RUN_DIR"]
    for stage in launch.STAGES.values():
        stage_argv = launch.stage_argv(stage, cfg)
        (tmp_path / "calls").unlink(missing_ok=True)
        subprocess.run(["bash", f"{stage.script}.slurm"], cwd=ROOT / "slurm", check=True,
                       env={**env, "SLURM_JOB_NAME": stage.script})
        assert (tmp_path / "calls").read_text().splitlines() == [
            "srun", "python -m moco.runtime.doctor --", "srun", f"python -m {stage.module} {stage_argv[0][:2]}"
        ], stage.script
        recorded = (tmp_path / "argv").read_bytes().decode().split("\0")[:-1]
        python = recorded.index(env["TASK_PYTHON"])
        assert recorded[python + 1:] == ["-m", stage.module, *stage_argv], stage.script
        if stage.script == "moco_v2":
            assert recorded[recorded.index("--epochs") + 1] == "100"
            assert recorded[recorded.index("-a") + 1] == "resnet50"
        if stage.script == "demo_mocov2_fpn_r1":
            assert recorded[recorded.index("--protocol") + 1] == "original"
        if stage.script == "demo_mocov2_fpn_r1":
            assert recorded[recorded.index("--epochs") + 1] == "2"  # R1_EPOCHS
        if stage.script == "demo_mocov2_fpn_r2":  # no knob set: the recipe's end epoch and batch, in demo.train
            assert "--epochs" not in recorded and "-b" not in recorded
            assert "--protocol" not in recorded


def test_the_jobs_follow_the_recipe_and_the_scripts(monkeypatch, tmp_path):
    """One owner each: a fine-tuning stage's end epoch and batch are demo/recipe.py's, which demo.train applies when
    the job passes neither; the launcher's resources and knob defaults are read from the job scripts' #SBATCH and
    knob lines, so an edited script is followed."""
    from demo import recipe
    from demo import train as demo_train

    cfg = {"RUN_DIR": "/runs/x", "LABELED_ROOT": "/data/labeled", "UNLABELED_DIR": "/data/unlabeled"}
    monkeypatch.setitem(recipe.STAGES, "r2", recipe.Stage("r2", lr_factor=0.1, end_epoch=31, previous="r1"))
    argv = launch.stage_argv(launch.STAGES["r2"], cfg)
    args = demo_train.get_parser().parse_args(argv)
    assert args.epochs is None and args.batch_size == recipe.REFERENCE_BATCH
    assert (args.epochs or recipe.STAGES[args.stage].end_epoch) == 31

    for path in (launch.SCRIPTS).glob("*.slurm"):
        (tmp_path / path.name).write_text(path.read_text())
    r1 = tmp_path / "demo_mocov2_fpn_r1.slurm"
    text = r1.read_text()
    for old, new in (("--gres=gpu:2", "--gres=gpu:3"), ("--time=24:00:00", "--time=1-02:30:00"),
                     ("--signal=B:USR1@900", "--signal=B:USR1@600"), ("--cpus-per-gpu=6", "--cpus-per-gpu=9"),
                     ("knob WORKERS 4 ", "knob WORKERS 7 "), ('knob EPOCHS ""', "knob EPOCHS 30")):
        assert old in text, old
        text = text.replace(old, new)
    r1.write_text(text)
    monkeypatch.setattr(launch, "SCRIPTS", tmp_path)
    res = launch.STAGES["r1"].resources
    assert (res.gpus, res.minutes, res.warn_s, res.cpus_per_gpu, res.mem_per_gpu) == (3, 26 * 60 + 30, 600, 9, "24G")
    argv = launch.stage_argv(launch.STAGES["r1"], cfg)
    assert argv[argv.index("-j") + 1] == "7" and argv[argv.index("--epochs") + 1] == "30"
    assert argv[argv.index("--bp") + 1] == "/runs/x/moco/checkpoint_last.pth.tar"
    assert launch.STAGES["eval"].resources.warn_s is None


def test_check_data_knob_runs_common_shs_check_before_the_tasks(tmp_path):
    """R1_CHECK_DATA=1: r1's batch script runs common.sh's check_data on LABELED_ROOT, whose errors stop the job;
    evaluation has no such knob, and the knob off adds nothing."""
    python = tmp_path / "python"
    python.write_text('#!/bin/bash\necho "$*" >"$RECORD"\nexit 1\n')
    python.chmod(0o755)
    cfg = {"TASK_PYTHON": str(python), "CONTAINER": "", "LABELED_ROOT": str(tmp_path / "my data"),
           "R1_CHECK_DATA": "1", "ALL_CHECK_DATA": "1"}
    assert launch.data_check(launch.STAGES["r2"], {**cfg, "R1_CHECK_DATA": "0", "ALL_CHECK_DATA": "0"}) == []
    assert launch.data_check(launch.STAGES["eval"], cfg) == []
    lines = launch.data_check(launch.STAGES["r1"], cfg)
    done = subprocess.run(["bash", "-c", "source slurm/common.sh; " + "; ".join(lines)], cwd=ROOT, text=True,
                          capture_output=True, env={"PATH": os.environ["PATH"], "RECORD": str(tmp_path / "argv")})
    assert done.returncode == 1 and "error: the data check found errors" in done.stdout
    assert (tmp_path / "argv").read_text() == f"-m demo.check {tmp_path / 'my data'}\n"


def test_data_staging_on_every_node_and_a_folder_a_node_lacks_refused(tmp_path, tiny_data):
    """The staging line of the batch script, in bash with an srun faking two nodes (it runs each command once as n1,
    once as n2): under NODE_SCRATCH each node unpacks its own copy; a job on two nodes whose data folder is not on
    every node stops, in one sentence naming NODE_SCRATCH."""
    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nstatus=0\n'
                                   'for node in n1 n2; do SLURMD_NODENAME=$node "$@" || status=1; done\n'
                                   'exit $status\n')
    (tmp_path / "srun").chmod(0o755)
    image = tmp_path / "labeled.sqsh"
    subprocess.run(["mksquashfs", str(tiny_data / "labeled"), str(image), "-no-progress"], check=True,
                   capture_output=True)
    scratch = tmp_path / "node-local"
    cfg = {"LABELED_SQSH": str(image), "LABELED_ROOT": str(scratch / "labeled"), "NODE_SCRATCH": str(scratch),
           "TASK_PYTHON": sys.executable, "CONTAINER": ""}
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2",
           "SLURMD_NODENAME": "n1"}

    def staged(cfg) -> subprocess.CompletedProcess:
        line = launch.data_staging(launch.STAGES["r1"], cfg)
        return subprocess.run(["bash", "-c", f"source slurm/common.sh; {line}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    done = staged(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"on n1: unpacking {image} into {scratch}/labeled\n", done.stdout), done.stdout
    assert f"on n2: {scratch}/labeled is already unpacked" in done.stdout  # the fake nodes share a filesystem
    assert (scratch / "labeled" / "training" / "images").is_dir()
    assert not list(scratch.glob("*.partial.*"))

    done = staged({**cfg, "LABELED_SQSH": "", "LABELED_ROOT": str(tmp_path / "nowhere")})
    assert done.returncode == 1
    assert done.stdout.rstrip().endswith(
        f"error: LABELED_ROOT={tmp_path / 'nowhere'} is not a folder on every node of this job (srun names the node "
        f"above): put it on a filesystem every node mounts, or under NODE_SCRATCH (node-local storage, in the site "
        f"config) with LABELED_SQSH naming its squashfs image, which each node then unpacks"), done.stdout


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=True, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_done(job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (info := job_info(job_id))["JobState"] not in FINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']} after {timeout:.0f} s"
        time.sleep(0.5)
    return info


def logs(job) -> str:
    return "".join(p.read_text() for p in (job.paths.stdout, job.paths.stderr) if p.exists())


@pytest.fixture
def launch_env(slurm_env, tiny_data, tmp_path, monkeypatch) -> dict:
    env = {**slurm_env, **TINY, "UNLABELED_DIR": str(tiny_data / "train"),
           "LABELED_ROOT": str(tiny_data / "labeled"), "RUN_DIR": str(tmp_path / "run"),
           "LOG_DIR": str(tmp_path / "logs")}
    del env["OMP_NUM_THREADS"]  # the jobs pick their threads: 6 CPUs a task, capped at this machine's cores
    _set_environ(monkeypatch, env)
    return env


@pytest.mark.slow
@pytest.mark.slurm
def test_pretraining_then_r1_as_an_afterok_chain(launch_env, capsys):
    jobs = launch.main(["--stages", "moco,r1", "--gpus-per-node", "1"])
    ids = {name: job.job_id for name, job in jobs}
    assert capsys.readouterr().out == f"moco {ids['moco']}\nr1 {ids['r1']}\n"
    assert Path(launch_env["LOG_DIR"], "submitit").is_dir()
    sbatch_r1 = jobs[1][1].paths.submission_file.read_text()
    assert f"--dependency=afterok:{ids['moco']}" in sbatch_r1 and "--kill-on-invalid-dep=yes" in sbatch_r1

    infos = {name: wait_done(job_id, 150) for name, job_id in ids.items()}
    assert {name: info["JobState"] for name, info in infos.items()} == {"moco": "COMPLETED", "r1": "COMPLETED"}, \
        {name: logs(job)[-3000:] for name, job in jobs}
    assert (infos["moco"]["Partition"], infos["r1"]["Partition"]) == ("v100-4", "v100-2")
    assert all(info["NumTasks"] == "1" and info["NumCPUs"] == "6" for info in infos.values())
    assert [job.result() for _, job in jobs] == [None, None]
    run = Path(launch_env["RUN_DIR"])
    assert checkpoint.load(run / "moco" / checkpoint.LAST)["epoch"] == 1
    assert checkpoint.load(run / "fpn" / "r1" / checkpoint.LAST)["epoch"] == 1


def _slow_pretraining(monkeypatch, stages: str) -> list:
    """Submit 3 epochs of 64-pixel crops (steps of ~0.3 s) and return once the second epoch is under way; where the
    signal then lands depends on the host, so the tests compare the resume with the stop the log shows."""
    monkeypatch.setenv("MOCO_EXTRA_ARGS", "--image-size 64 --moco-k 256 --bn-splits 4 -p 1")
    monkeypatch.setenv("MOCO_EPOCHS", "3")
    jobs = [job for _, job in launch.main(["--stages", stages, "--gpus-per-node", "1"])]
    deadline = time.monotonic() + 120
    while not re.search(r"epoch 1 step [2-5]/8", logs(jobs[0])):
        assert time.monotonic() < deadline and job_info(jobs[0].job_id)["JobState"] not in FINAL, logs(jobs[0])
        time.sleep(0.2)
    return jobs


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("command, stopped_by, through_submitit", [
    # What submitit's --signal=USR2@300 sends near the time limit: to every process, data-loader workers included,
    # here under forkserver (Python 3.14's default), whose workers do not inherit the task's handler.
    (["scancel", "--signal=USR2"], "SIGUSR2", True),
    (["scontrol", "requeue"], "SIGTERM", False),  # a preemption that requeues: Slurm sends SIGTERM and requeues
], ids=["time-limit-signal-forkserver-workers", "scontrol-requeue"])
def test_interrupted_pretraining_checkpoints_at_the_step_and_resumes(launch_env, monkeypatch, tmp_path, command,
                                                                   stopped_by, through_submitit):
    if stopped_by == "SIGUSR2":
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import multiprocessing\n"
                                               "multiprocessing.set_start_method('forkserver')\n")
        monkeypatch.setenv("PYTHONPATH", f"{site}:{launch_env['PYTHONPATH']}")
        monkeypatch.setenv("MOCO_WORKERS", "1")
    [job] = _slow_pretraining(monkeypatch, "moco")
    forkserver = _has_forkserver(job.job_id)
    subprocess.run([*command, job.job_id], check=True)
    info = wait_done(job.job_id, 180)
    log = logs(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert forkserver == (stopped_by == "SIGUSR2")
    assert not any(failure in log for failure in ("killed by signal", "exited unexpectedly")), log
    assert moco_resume_point(log) == stop_point(log, stopped_by, 8) >= (1, 0), log
    assert ("Requeued job" in log) == through_submitit, log
    metrics = Path(launch_env["RUN_DIR"]) / "moco" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2, 3]  # no epoch lost or trained twice


@pytest.mark.slow
@pytest.mark.slurm
def test_stopped_stage_is_no_success_for_the_next(launch_env, monkeypatch):
    """SIGTERM that no requeue follows: the checkpoint is saved, status 75 fails the job, r1 never starts."""
    moco, r1 = _slow_pretraining(monkeypatch, "moco,r1")
    subprocess.run(["scancel", "--signal=TERM", moco.job_id], check=True)
    info = wait_done(moco.job_id, 60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), logs(moco)
    assert wait_done(r1.job_id, 30)["JobState"] == "CANCELLED"
    saved = checkpoint.load(Path(launch_env["RUN_DIR"]) / "moco" / checkpoint.LAST)
    assert (saved["epoch"], saved["step"]) == stop_point(logs(moco), "SIGTERM", 8) >= (1, 0)


def test_a_time_limit_not_above_twice_the_warning_lead_is_refused(capsys):
    """As the job scripts refuse it at their start: r1 is warned 900 s before its limit."""
    with pytest.raises(SystemExit):
        launch.parse_args(["--stages", "r1,r2", "--timeout-min", "29"])
    assert "--timeout-min 29: stage r1 is warned 900 s before its time limit" in capsys.readouterr().err
    assert launch.parse_args(["--stages", "r1", "--timeout-min", "30"]).timeout_min == 30
    assert launch.parse_args(["--stages", "eval", "--timeout-min", "5"]).timeout_min == 5  # no warning asked
