"""moco.runtime.harness: the start, the failures and the end that pretraining and the detection stages share."""
import pytest
import torch.distributed as dist

from moco.runtime import checkpoint, failures
from moco.runtime.harness import run_training
from moco.runtime.logger import get_logger
from moco.runtime.runlock import DirectoryLock

log = get_logger("tests.harness")


def test_the_training_runs_in_its_claimed_directory_and_logs_there(tmp_path):
    run_dir = tmp_path / "run"

    def train(env, metrics_writer, claimed):
        assert (env.rank, env.world_size, claimed) == (0, 1, "claimed")
        assert (run_dir / "run.lock").is_file()
        log.info("training in %s", run_dir)
        return "trained"

    def claim(lock):
        lock.acquire()
        return "claimed"

    assert run_training(run_dir, "cpu", train, claim) == "trained"
    assert f"training in {run_dir}" in (run_dir / "train.log").read_text()
    DirectoryLock(run_dir).acquire()  # released on the way out


def test_a_failure_leaves_as_its_exit_status_and_releases_the_lock(tmp_path):
    run_dir = tmp_path / "run"

    def diverge(env, metrics_writer, claimed):
        raise failures.NonFiniteLoss("non-finite loss at epoch 0 step 3: nan")

    with pytest.raises(SystemExit) as stop:
        run_training(run_dir, "cpu", diverge)
    assert stop.value.code == failures.EXIT_DIVERGED
    assert "non-finite loss at epoch 0 step 3" in (run_dir / "train.log").read_text()
    assert not dist.is_initialized()
    DirectoryLock(run_dir).acquire()


def test_a_directory_held_by_another_run_is_refused_before_the_training(tmp_path):
    run_dir = tmp_path / "run"
    holder = DirectoryLock(run_dir)
    holder.acquire()
    (run_dir / "train.log").write_text("the holder's log\n")
    trained = []
    try:
        with pytest.raises(SystemExit) as refused:
            run_training(run_dir, "cpu", lambda *_: trained.append(1))
    finally:
        holder.release()
    assert "is in use by another run" in str(refused.value.code) and trained == []
    assert (run_dir / "train.log").read_text() == "the holder's log\n"
    assert not (run_dir / checkpoint.LAST).exists()
