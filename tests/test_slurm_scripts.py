"""The job scripts' static contract, without a cluster: partitions, knobs, the repository found from anywhere."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
PARTITION_OF = {"moco_v2": "PRETRAIN_PARTITION", "demo_mocov2_fpn_r1": "FINETUNE_PARTITION",
                "demo_mocov2_fpn_r2": "FINETUNE_PARTITION", "demo_mocov2_fpn_r3": "FINETUNE_PARTITION",
                "eval_mocov2_fpn": "EVAL_PARTITION"}


def bash(script: str, env: dict | None = None) -> str:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True,
                          timeout=30).stdout


def example_config() -> dict:
    out = bash(f'REPO={ROOT}; source {SLURM}/site.conf.example; for v in {" ".join(set(PARTITION_OF.values()))}; '
               'do echo "$v=${!v}"; done', env={"PATH": "/usr/bin:/bin"})
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("name", sorted(PARTITION_OF))
def test_sbatch_partition_is_the_example_configs(name):
    """Plain `sbatch` and `make pipeline` ask for the same partitions out of the box."""
    text = (SLURM / f"{name}.slurm").read_text()
    assert re.findall(r"^#SBATCH --partition=(\S+)$", text, re.M) == [example_config()[PARTITION_OF[name]]]
    assert re.search(r"^#SBATCH --requeue$", text, re.M)


def test_local_cluster_has_the_example_configs_partitions():
    from slurm import local_cluster

    assert set(local_cluster.DEFAULT_PARTITIONS) == set(example_config().values())


def test_knob_takes_the_most_specific_name_and_never_a_bare_one():
    """R1_ over FPN_ over ALL_; a leftover `export EPOCHS=1` or `export WORKERS=0` is ignored, and the log says so."""
    common = f'REPO={ROOT}; source {SLURM}/common.sh; STAGE=R1 GROUP=FPN; '
    env = {"PATH": "/usr/bin:/bin", "EPOCHS": "1", "ALL_EPOCHS": "5", "FPN_EPOCHS": "6", "R1_EPOCHS": "7",
           "WORKERS": "0", "ALL_WORKERS": "2", "FPN_LR": "0.1", "BATCH_SIZE": "64"}
    out = bash(common + 'knob EPOCHS 23 >/dev/null; knob WORKERS 4 >/dev/null; knob LR "" >/dev/null; '
               'knob BATCH_SIZE 4 >&2; echo "$EPOCHS $WORKERS $LR $BATCH_SIZE"', env)
    assert out.split() == ["7", "2", "0.1", "4"]
    log = subprocess.run(["bash", "-c", common + "knob BATCH_SIZE 4"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "ignored: BATCH_SIZE=64 from the environment (the knob is R1_BATCH_SIZE, or ALL_BATCH_SIZE)" in log
    assert log.rstrip().endswith("BATCH_SIZE=4")


def test_config_values_from_the_environment_win():
    out = bash(f'REPO={ROOT}; source {SLURM}/common.sh; load_config >/dev/null; echo "$RUN_DIR|$EVAL_PARTITION"',
               env={"PATH": "/usr/bin:/bin", "RUN_DIR": "/scratch/me/run"})
    assert out.strip() == "/scratch/me/run|v100-1"


def test_missing_site_config_named_in_the_error(tmp_path):
    result = subprocess.run(["bash", "-c", f'REPO={ROOT}; source {SLURM}/common.sh; load_config'],
                            env={"PATH": "/usr/bin:/bin", "SITE_CONF": str(tmp_path / "nope.conf")},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"site config {tmp_path / 'nope.conf'}: no such file" in result.stdout


# srun on one node: it notes its call and runs the command after its options.
FAKE_SRUN = '#!/bin/bash\necho srun >>"$CALLS"\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n'


@pytest.mark.parametrize("variables, tasks", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1"}, 4),
    ({"SLURM_STEP_GPUS": "0,1,2,3"}, 4),
    ({"SLURM_JOB_GPUS": "2,3"}, 2),
    ({"SLURM_JOB_GPUS": "0-3"}, 4),
    ({"SLURM_GPUS_PER_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2),
    ({"SLURM_TRES_PER_NODE": "gres/gpu:4"}, 4),
    ({"SLURM_TRES_PER_NODE": "gres:gpu:4"}, 4),
    ({"SLURM_TRES_PER_NODE": "cpu:6,gres/gpu:v100:3"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"SLURM_JOB_GPUS": "NoDevFiles", "CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, 2),
    ({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": "0,1"}, 1),  # Slurm's word wins over a leftover
    ({}, 1),
    ({"SLURM_GPUS_ON_NODE": "4", "TASKS_PER_NODE": "2"}, 2),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_one_task_per_gpu_whichever_variable_counts_them(tmp_path, variables, tasks):
    """Slurm versions and gres setups set different variables: where SLURM_GPUS_ON_NODE is missing, one task took
    cuda:0 of 4 and MoCo switched to split BatchNorm, another recipe at a quarter of the speed."""
    (tmp_path / "srun").write_text('#!/bin/bash\necho "$@" >"$RECORD"\n')
    (tmp_path / "srun").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RECORD": str(tmp_path / "argv"), "SLURM_JOB_ID": "7",
           "TASK_PYTHON": "python", "RENDEZVOUS_ADDR": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", **variables}
    out = bash(f'REPO={ROOT}; source {SLURM}/common.sh; run_tasks -m moco.train', env)
    assert f"--ntasks-per-node={tasks} " in (tmp_path / "argv").read_text(), out
    assert f"tasks per node: {tasks} (" in out


def test_unpack_squashfs_is_all_or_nothing(tmp_path):
    """A failed unpack leaves no destination behind, so the next job tries again instead of using half a copy."""
    broken = tmp_path / "broken.sqsh"
    broken.write_bytes(b"not a squashfs image")
    result = subprocess.run(["bash", "-c", f'REPO={ROOT}; source {SLURM}/common.sh; SLURM_JOB_ID=7; '
                             f'unpack_squashfs {broken} {tmp_path / "data"}'], env={"PATH": "/usr/bin:/bin:/usr/sbin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "unsquashfs" in result.stdout
    assert not (tmp_path / "data").exists()


def test_each_submission_is_a_run_of_its_own_and_keeps_slurms_output(tmp_path):
    """submit.sh (make pipeline): every job of one submission gets the same new RUN_DIR, named after the date and
    time; the next submission another; RUN_DIR or RUN_NAME given: that run. Slurm's own output goes to LOG_DIR."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$RUN_DIR $*" >>"$RECORD"\necho $((RANDOM + 1))\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(tmp_path / "record"), "LOG_DIR": str(tmp_path / "logs")}

    def submit(**extra) -> list[list[str]]:
        (tmp_path / "record").unlink(missing_ok=True)
        subprocess.run([str(SLURM / "submit.sh"), "moco_v2", "demo_mocov2_fpn_r1"], env={**env, **extra}, check=True,
                       capture_output=True, timeout=30)
        return [line.split() for line in (tmp_path / "record").read_text().splitlines()]

    first = submit()
    assert len(first) == 2 and first[0][0] == first[1][0]
    assert re.fullmatch(rf"{ROOT}/runs/\d{{8}}-\d{{6}}", first[0][0])
    assert all(f"--output={tmp_path}/logs/%x_%j.slurm.out" in call for call in first)
    time.sleep(1.1)
    assert submit()[0][0] != first[0][0]
    assert {call[0] for call in submit(RUN_NAME="smoke")} == {f"{ROOT}/runs/smoke"}
    assert {call[0] for call in submit(RUN_DIR="/scratch/me/run")} == {"/scratch/me/run"}


def test_sigterm_is_not_passed_on_to_srun(tmp_path):
    """Slurm signals every process of the job: srun passing on a second TERM would kill the step mid-checkpoint."""
    out = bash(f'REPO={ROOT}; source {SLURM}/common.sh; trap on_terminate TERM; sleep 30 & TASKS_PID=$!; '
               'kill -TERM $$; kill -0 $TASKS_PID && echo alive; kill $TASKS_PID', env={"PATH": "/usr/bin:/bin"})
    assert "the tasks received it too" in out and out.rstrip().endswith("alive")


@pytest.mark.parametrize("limit, seconds", [("4:00", 240), ("1:02:03", 3723), ("2-00:00:10", 172810),
                                            ("UNLIMITED", None), ("", None)])
def test_slurm_durations_read_as_seconds(limit, seconds):
    result = subprocess.run(["bash", "-c", f'source {SLURM}/common.sh; seconds "$1"', "x", limit],
                            capture_output=True, text=True)
    assert (result.stdout.strip() or None) == (None if seconds is None else str(seconds))
    assert (result.returncode == 0) == (seconds is not None)


def test_check_data_runs_the_check_first_and_its_errors_stop_the_job(tmp_path):
    """R1_CHECK_DATA=1: the job runs demo.check on LABELED_ROOT after the preflight; a bad label file stops the job
    (exit 1, nothing run, the report in the log), and so does a check that cannot run; a check that passes goes on
    to srun; the knob off runs no check."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    # The preflight and srun are faked; the check is the real one unless CHECK_STATUS fakes its exit status.
    (bin_dir / "python").write_text(f'#!/bin/bash\necho "python $*" >>"$CALLS"\n[[ $2 == demo.check ]] || exit 0\n'
                                    f'[[ -n $CHECK_STATUS ]] && exit $CHECK_STATUS\nexec {sys.executable} "$@"\n')
    for tool in ("srun", "python"):
        (bin_dir / tool).chmod(0o755)
    labeled = tmp_path / "labeled"
    for folder in ("images", "labels"):
        (labeled / "training" / folder).mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(labeled / "training/images/1.JPEG")
    label = labeled / "training/labels/1.yml"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SITE_CONF": str(SLURM / "site.conf.example"),
           "TASK_PYTHON": str(bin_dir / "python"), "CALLS": str(tmp_path / "calls"), "LOG_DIR": str(tmp_path / "logs"),
           "RUN_DIR": str(tmp_path / "run"), "LABELED_ROOT": str(labeled), "SLURM_SUBMIT_DIR": str(SLURM),
           "SLURM_JOB_NAME": "demo_mocov2_fpn_r1", "R1_CHECK_DATA": "1"}

    def job(job_id: int, **extra) -> tuple[int, list[str], str]:
        (tmp_path / "calls").unlink(missing_ok=True)
        done = subprocess.run(["bash", "demo_mocov2_fpn_r1.slurm"], cwd=SLURM, capture_output=True, timeout=120,
                              env={**env, "SLURM_JOB_ID": str(job_id), **extra})
        log = (tmp_path / "logs" / f"demo_mocov2_fpn_r1_{job_id}.out").read_text()
        return done.returncode, (tmp_path / "calls").read_text().splitlines(), log

    label.write_text("bboxes: [[1, 2, 20, 20]]\nlabels: [dgo]\n")
    status, calls, log = job(1)
    assert status == 1 and [c.split()[:3] for c in calls] == [["srun"], ["python", "-m", "moco.runtime.doctor"],
                                                              ["python", "-m", "demo.check"]]
    assert f"unknown class: 1 file\n    {label}: ['dgo']" in log
    assert "error: the data check found errors, listed by kind in its report above in this log" in log
    assert "R1_CHECK_DATA=0" in log.splitlines()[-1]

    status, calls, log = job(2, CHECK_STATUS="0")
    assert status == 0 and [c.split()[:3] for c in calls] == [
        ["srun"], ["python", "-m", "moco.runtime.doctor"], ["python", "-m", "demo.check"], ["srun"],
        ["python", "-m", "demo.train"]]
    assert calls[2] == f"python -m demo.check {labeled}"
    assert "data check passed" in log

    status, calls, log = job(3, CHECK_STATUS="2")
    assert status == 1 and calls.count("srun") == 1  # the preflight's
    assert "error: the data check could not run (python -m demo.check, status 2, above)" in log

    status, calls, _ = job(4, R1_CHECK_DATA="0")
    assert status == 0 and [c.split()[:3] for c in calls] == [["srun"], ["python", "-m", "moco.runtime.doctor"],
                                                              ["srun"], ["python", "-m", "demo.train"]]
