import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small dataset from the project's generator, shared by the tests that train."""
    from moco.course.tinyset import generate

    out = tmp_path_factory.mktemp("tiny")
    generate(out, unlabeled=256, train=48, val=16, seed=0, workers=1)
    return out


@pytest.fixture(scope="module")
def moco_state() -> dict:
    """A ResNet-18 MoCo v2's state dict as moco.train and facebookresearch/moco save it: module.encoder_q.* with
    the MLP head, module.encoder_k.*, the queue. Its BatchNorm statistics are not trivial, so a mix-up shows."""
    import torch
    import torchvision.models as tv_models

    from moco.builder import MoCo

    torch.manual_seed(0)
    moco = MoCo(tv_models.resnet18, dim=16, K=32, m=0.99, T=0.2, mlp=True)
    for module in moco.encoder_q.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return {f"module.{k}": v for k, v in moco.state_dict().items()}


def _clean_env() -> dict:
    """os.environ without launcher variables, the repository importable, one thread a process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child Python processes."""
    return _clean_env()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private two-node Slurm (n1, n2, 4 fake GPUs each, the example config's partitions) for the session,
    started by the same code as `make slurm-up` (which installs Slurm when it is missing)."""
    from slurm import local_cluster

    cluster = local_cluster.start(tmp_path_factory.mktemp("slurm"), nodes=2, gpus=4)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster) -> dict:
    """Environment for sbatch: this cluster, this virtualenv's Python in the jobs, no site config of the user, and
    the CPU chosen on purpose: the cluster's GPUs are fake, and a job given GPUs it cannot use refuses to run."""
    env = slurm_cluster.env(_clean_env())
    env.update(TASK_PYTHON=sys.executable, SITE_CONF=str(ROOT / "slurm" / "site.conf.example"), MOCO_DEVICE="cpu")
    return env


@pytest.fixture
def job_env(slurm_env, tiny_data, tmp_path) -> dict:
    """Knobs for a job on the tiny data, writing to this test's own run and log directories (here, not in
    test_slurm.py, so that the other real-Slurm test files get it without importing a fixture by name)."""
    from test_slurm import TINY_FPN, TINY_MOCO

    return {**slurm_env, "UNLABELED_DIR": str(tiny_data / "train"), "LABELED_ROOT": str(tiny_data / "labeled"),
            "RUN_DIR": str(tmp_path / "run"), "LOG_DIR": str(tmp_path / "logs"), "ALL_WORKERS": "0",
            "OMP_NUM_THREADS": "2", **TINY_MOCO, **TINY_FPN,
            # Leftovers of a user's shell: were a job to read them, the epoch counts the tests check would change.
            "EPOCHS": "1"}
