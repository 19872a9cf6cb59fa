import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end runs (skip locally with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small dataset from the project's generator, shared by the tests that train."""
    from moco.tinyset import generate

    out = tmp_path_factory.mktemp("tiny")
    generate(out, unlabeled=256, train=48, val=16, seed=0, workers=1)
    return out


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child Python processes: the repository importable, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env
