"""The job scripts' static contract, without a cluster: partitions, knobs, the repository found from anywhere."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    sys.path.insert(0, str(SLURM))
    import local_cluster

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


def test_unpack_squashfs_is_all_or_nothing(tmp_path):
    """A failed unpack leaves no destination behind, so the next job tries again instead of using half a copy."""
    broken = tmp_path / "broken.sqsh"
    broken.write_bytes(b"not a squashfs image")
    result = subprocess.run(["bash", "-c", f'REPO={ROOT}; source {SLURM}/common.sh; SLURM_JOB_ID=7; '
                             f'unpack_squashfs {broken} {tmp_path / "data"}'], env={"PATH": "/usr/bin:/bin:/usr/sbin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "unsquashfs" in result.stdout
    assert not (tmp_path / "data").exists()
