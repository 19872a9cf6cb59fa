"""Runs that survive bad checkpoints, full disks and diverging losses: an unreadable checkpoint_last falls back to
an earlier one, a failed save keeps the previous checkpoint and ends the run with status 74, a non-finite loss
stops every rank at the same step with status 70, before anything is applied or saved."""
import errno
import logging
import re
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from moco import train as moco_train
from moco.runtime import checkpoint, failures, runs

MOCO = ["-a", "resnet18", "--image-size", "32", "-b", "16", "--moco-k", "64", "--mlp", "-j", "0", "--bn-splits", "4",
        "--precision", "off", "--save-freq", "1"]
FAULTY = str(Path(__file__).with_name("faulty_run.py"))


def _no_training(*args, **kwargs):
    return {"loss": 0.0, "acc1": 0.0, "images_per_s": 0.0}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """64 unlabeled images: 4 steps an epoch at batch 16."""
    folder = tmp_path_factory.mktemp("unlabeled")
    for n in range(64):
        Image.new("RGB", (40, 40), (n * 4, 255 - n * 4, n % 7 * 30)).save(folder / f"{n}.png")
    return folder


def _moco(images, out, *extra) -> list[str]:
    return [str(images), "--output-dir", str(out), *MOCO, *extra]


def _tmp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp" in p.name]


# Readable checkpoints: the fallback and its refusal.

def test_numbered_checkpoints_in_epoch_order(tmp_path):
    for name in ("checkpoint_0010.pth.tar", "checkpoint_0002.pth.tar", "checkpoint_last.pth.tar",
                 ".checkpoint_0011.pth.tar.tmp42", "checkpoint_best.pth.tar", "checkpoint_12000.pth.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in checkpoint.numbered(tmp_path)] == [
        "checkpoint_0002.pth.tar", "checkpoint_0010.pth.tar", "checkpoint_12000.pth.tar"]


def test_unreadable_last_falls_back_to_the_newest_readable_earlier_checkpoint(tmp_path, caplog):
    for epoch in (1, 2, 3):
        checkpoint.save_atomic({"epoch": epoch}, tmp_path / checkpoint.numbered_name(epoch))
    last, newest = tmp_path / checkpoint.LAST, tmp_path / checkpoint.numbered_name(3)
    last.write_bytes(b"garbage")
    _truncate(newest)
    with caplog.at_level(logging.WARNING):
        chosen = runs.resume_file(last, "", checkpoint.numbered(tmp_path)[::-1])
    assert chosen == tmp_path / checkpoint.numbered_name(2)
    [warning] = caplog.messages
    assert warning.startswith(f"{last}: not a readable checkpoint (")
    assert f"; {newest}: not a readable checkpoint (" in warning
    assert warning.endswith(f"; continuing from {chosen} instead")


def test_nothing_readable_is_a_clear_error_naming_the_files_tried(tmp_path):
    last, best = tmp_path / checkpoint.LAST, tmp_path / "checkpoint_best.pth.tar"
    last.write_bytes(b"")
    with pytest.raises(ValueError) as refused:
        runs.resume_file(last, "", [best])
    message = str(refused.value)
    assert message.startswith(f"no readable checkpoint to continue from: {last}: not a readable checkpoint (")
    assert message.endswith(f"; {best}: no such checkpoint. Starting afresh would lose the run: restore one of "
                            f"them, or move {tmp_path} aside to start over")


def test_moco_continues_from_the_newest_readable_numbered_checkpoint(images, tmp_path, monkeypatch):
    monkeypatch.setattr(moco_train, "train_one_epoch", _no_training)
    run = tmp_path / "run"
    moco_train.main(_moco(images, run, "--epochs", "3"))
    run_id = checkpoint.load(run / checkpoint.LAST)["run_id"]
    _truncate(run / checkpoint.LAST)
    _truncate(run / checkpoint.numbered_name(3))
    moco_train.main(_moco(images, run, "--epochs", "3"))
    log = (run / "train.log").read_text()
    assert f"{run / checkpoint.LAST}: not a readable checkpoint" in log
    assert f"; continuing from {run / checkpoint.numbered_name(2)} instead" in log
    assert f"resumed from {run / checkpoint.numbered_name(2)} at epoch 2" in log
    final = checkpoint.load(run / checkpoint.LAST)  # epoch 3 trained again, and both its files written anew
    assert (final["epoch"], final["run_id"]) == (3, run_id)
    assert checkpoint.load(run / checkpoint.numbered_name(3))["epoch"] == 3


def test_moco_refuses_to_start_afresh_when_nothing_reads(images, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.LAST).write_bytes(b"\0" * 64)
    with pytest.raises(SystemExit, match=rf"(?s)^error: no readable checkpoint to continue from: "
                                         rf"{run / checkpoint.LAST}: not a readable checkpoint .* or move {run} "
                                         rf"aside to start over$"):
        moco_train.main(_moco(images, run, "--epochs", "1"))
    assert (run / checkpoint.LAST).read_bytes() == b"\0" * 64


def test_keep_leaves_the_newest_numbered_checkpoints_and_last(images, tmp_path, monkeypatch):
    monkeypatch.setattr(moco_train, "train_one_epoch", _no_training)
    moco_train.main(_moco(images, tmp_path, "--epochs", "4", "--keep", "2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [
        "checkpoint_0003.pth.tar", "checkpoint_0004.pth.tar", checkpoint.LAST]
    with pytest.raises(SystemExit, match="--keep -1: a number of checkpoints, or 0 to keep them all"):
        moco_train.main(_moco(images, tmp_path / "other", "--epochs", "1", "--keep", "-1"))


# Failed saves.

def test_a_save_into_a_full_filesystem_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.LAST
    checkpoint.save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    def full(fd):  # where a full disk often shows first: delayed allocation, NFS
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 0, 12 << 20))
    with pytest.raises(checkpoint.WriteError) as failed:
        checkpoint.save_atomic({"epoch": 2}, path)
    assert str(failed.value) == (f"cannot write {path}: [Errno 28] No space left on device (12.0 MiB free on that "
                                 f"filesystem); the previous checkpoint is intact")
    assert path.read_bytes() == before and not _tmp_files(tmp_path)


SAVE_UNDER_LIMIT = """
import resource, signal, sys, torch
from moco.runtime import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save_atomic({"w": torch.zeros(1 << 16)}, sys.argv[1])
except checkpoint.WriteError as exc:
    print(exc)
"""


def test_a_write_refused_by_the_file_size_limit_is_reported_as_such(tmp_path, subprocess_env):
    """torch.save turns the OSError of a refused write into a RuntimeError without its errno: the errno is kept."""
    path = tmp_path / checkpoint.LAST
    result = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(path)], env=subprocess_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cannot write {path}: [Errno 27] File too large (")
    assert result.stdout.rstrip().endswith(" free on that filesystem)")  # nothing was there before
    assert not path.exists() and not _tmp_files(tmp_path)


@pytest.fixture(scope="module")
def epoch_one(images, tmp_path_factory):
    """The checkpoint of a 2-epoch run after its first epoch (really trained)."""
    run = tmp_path_factory.mktemp("moco")
    moco_train.main(_moco(images, run, "--epochs", "2"))
    return run / checkpoint.numbered_name(1)


def _resumed_run(epoch_one, run: Path) -> bytes:
    """A run directory whose checkpoint_last is epoch_one's: its next save comes after one more epoch."""
    run.mkdir()
    shutil.copy(epoch_one, run / checkpoint.LAST)
    return (run / checkpoint.LAST).read_bytes()


def _faulty(args, env, **faults) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, FAULTY, *args], env={**env, **faults}, cwd=env["PYTHONPATH"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_failed_save_ends_the_run_with_status_74_and_the_previous_checkpoint(images, epoch_one, tmp_path,
                                                                             subprocess_env):
    run = tmp_path / "run"
    before = _resumed_run(epoch_one, run)
    result = _faulty(_moco(images, run, "--epochs", "2"), subprocess_env, FSIZE_LIMIT=str(1 << 20))
    assert result.returncode == failures.EXIT_IOERR, result.stdout[-3000:] + result.stderr[-3000:]
    message = (rf"cannot write {run / checkpoint.LAST}: \[Errno 27\] File too large \([\d.]+ [MG]iB free on that "
               rf"filesystem\); the previous checkpoint is intact \(exit status 74\)")
    assert len(re.findall(message, result.stdout)) == 1, result.stdout[-3000:]
    assert (run / checkpoint.LAST).read_bytes() == before
    assert not _tmp_files(run) and not (run / checkpoint.numbered_name(2)).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(args, env, faults: dict[int, dict]) -> list[tuple[int, str]]:
    """Both ranks of a gloo run (as torchrun would start them), each with its own faults: (status, output) each."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, FAULTY, *args], cwd=env["PYTHONPATH"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **faults.get(rank, {})})
             for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]  # far below the 30-minute collective timeout
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [(p.returncode, output) for p, output in zip(procs, outputs)]


@pytest.mark.slow
def test_a_failed_save_on_rank_0_ends_every_rank(images, tmp_path, subprocess_env):
    run = tmp_path / "run"
    ranks = _two_ranks(_moco(images, run, "--epochs", "1"), subprocess_env, {0: {"FSIZE_LIMIT": str(1 << 20)}})
    for status, output in ranks:
        assert status == failures.EXIT_IOERR, output[-3000:]
        assert f"cannot write {run / checkpoint.LAST}: [Errno 27] File too large (" in output
    assert not (run / checkpoint.LAST).exists() and not _tmp_files(run)


# Non-finite losses.

def test_check_loss_passes_finite_losses_and_stops_at_others():
    described = []

    def details():
        described.append(1)
        return "loss_a 0.5, loss_b nan"

    failures.check_loss(torch.tensor(2.5), 0, 0, details)
    assert not described  # described only when something is wrong
    for bad, shown in ((float("nan"), "nan"), (float("inf"), "inf")):
        with pytest.raises(failures.NonFiniteLoss) as stopped:
            failures.check_loss(torch.tensor(bad, requires_grad=True), 3, 120, details)
        assert str(stopped.value) == f"non-finite loss at epoch 3 step 120: {shown} (loss_a 0.5, loss_b nan)"


def test_logits_are_described_by_their_non_finite_count_and_range():
    def described(logits):
        return moco_train.describe_logits(moco_train.logit_figures(logits).tolist())

    assert described(torch.tensor([[1.5, float("nan")], [-2.0, float("inf")]])) == (
        "2 of 4 logits not finite, the others in [-2, 1.5]")
    assert described(torch.full((1, 2), float("nan"))) == "2 of 2 logits not finite"


def test_the_loss_watch_reports_the_first_non_finite_step_only_when_checked():
    watch = failures.LossWatch(torch.device("cpu"), 4, moco_train.describe_logits)
    finite = torch.tensor([[0.5, -1.0]])
    for step, loss, logits in ((10, 2.0, finite), (11, float("nan"), torch.tensor([[float("nan"), 3.0]])),
                               (12, float("inf"), finite)):
        watch.observe(step, torch.tensor(loss), moco_train.logit_figures(logits))
    assert not watch.due(11) and watch.due(20)
    with pytest.raises(failures.NonFiniteLoss) as stopped:
        watch.check(4)
    assert str(stopped.value) == ("non-finite loss at epoch 4 step 11: nan (1 of 2 logits not finite, the others in "
                                  "[3, 3])")
    clean = failures.LossWatch(torch.device("cpu"), 4, moco_train.describe_logits)
    clean.observe(0, torch.tensor(1.0), moco_train.logit_figures(finite))
    clean.check(0)


@pytest.mark.parametrize("error, status, message", [
    (checkpoint.WriteError("cannot write x: [Errno 122] Disk quota exceeded"), failures.EXIT_IOERR,
     "cannot write x: [Errno 122] Disk quota exceeded (exit status 74)"),
    (failures.NonFiniteLoss("non-finite loss at epoch 3 step 7: nan (l 1)"), failures.EXIT_DIVERGED,
     "non-finite loss at epoch 3 step 7: nan (l 1): the run stopped and saved nothing after it; "
     "checkpoint_last.pth.tar (epoch 3, step 5) is intact. Try a lower --lr (exit status 70)"),
], ids=["save", "non-finite"])
def test_each_failure_ends_with_its_status_and_one_message(tmp_path, caplog, error, status, message):
    checkpoint.save_atomic({"epoch": 3, "step": 5}, tmp_path / checkpoint.LAST)
    with pytest.raises(SystemExit) as ended, failures.exit_statuses(tmp_path / checkpoint.LAST):
        raise error
    assert ended.value.code == status
    assert caplog.messages == [message]


def test_a_run_that_diverges_before_its_first_save_says_so(tmp_path, caplog):
    with pytest.raises(SystemExit), failures.exit_statuses(tmp_path / checkpoint.LAST):
        raise failures.NonFiniteLoss("non-finite loss at epoch 0 step 2: inf (l 1)")
    assert "; nothing was saved since it started. Try a lower --lr" in caplog.text


def test_an_error_leaving_the_trainer_lets_go_of_its_objects(tmp_path):
    """Else a DDP model kept alive by the error's frames would leave the process group last, at exit, holding the
    GIL: a hang (see moco.runtime.distributed.cleanup_distributed)."""
    class Model:
        pass

    held = []

    def train():
        model = Model()
        held.append(weakref.ref(model))
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug") as raised, failures.exit_statuses(tmp_path / checkpoint.LAST):
        train()
    assert held[0]() is None and raised.traceback  # the error is kept, with its traceback, but not train's locals


@pytest.mark.slow
def test_a_non_finite_loss_exits_70_and_leaves_checkpoint_last_as_it_was(images, epoch_one, tmp_path,
                                                                        subprocess_env):
    run = tmp_path / "run"
    before = _resumed_run(epoch_one, run)
    result = _faulty(_moco(images, run, "--epochs", "2"), subprocess_env, NAN_AT="0:2")  # epoch 1, step 1
    assert result.returncode == failures.EXIT_DIVERGED, result.stdout[-3000:] + result.stderr[-3000:]
    assert "non-finite loss at epoch 1 step 1: nan (1 of 1040 logits not finite, the others in [" in result.stdout
    assert ("the run stopped and saved nothing after it; checkpoint_last.pth.tar (epoch 1) is intact. Try a lower "
            "--lr (exit status 70)" in result.stdout)
    assert (run / checkpoint.LAST).read_bytes() == before
    assert not (run / checkpoint.numbered_name(2)).exists()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_at_the_same_step(images, tmp_path, subprocess_env):
    run = tmp_path / "run"
    ranks = _two_ranks(_moco(images, run, "--epochs", "2"), subprocess_env, {1: {"NAN_AT": "1:7"}})
    for status, output in ranks:  # 4 steps an epoch: rank 1's 7th step is epoch 1, step 2
        assert status == failures.EXIT_DIVERGED, output[-3000:]
        assert "non-finite loss at epoch 1 step 2: nan on rank 1 (1 of 520 logits not finite, the others in [" in output
        assert "checkpoint_last.pth.tar (epoch 1) is intact" in output
    assert checkpoint.load(run / checkpoint.LAST)["epoch"] == 1
    assert not (run / checkpoint.numbered_name(2)).exists()
