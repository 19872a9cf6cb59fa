"""Runs that cannot mix: --resume against a run's own checkpoint, the directory lock, the recorded upstream of
pretraining and of each fine-tuning stage, and the one starting point rank 0 chooses for all ranks."""
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from demo import evaluate as demo_evaluate
from demo import lineage
from demo import train as demo_train
from moco import train as moco_train
from moco.runtime import checkpoint, runs
from moco.runtime.logger import setup_logging
from moco.runtime.runlock import DirectoryLock

MOCO = ["-a", "resnet18", "--image-size", "32", "-b", "32", "--moco-k", "64", "--mlp", "-j", "0", "--bn-splits", "4",
        "--precision", "off"]


def _no_training(*args, **kwargs):
    return {"loss": 0.0, "acc1": 0.0, "images_per_s": 0.0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One batch of unlabeled images: enough for moco.train to start."""
    folder = tmp_path_factory.mktemp("unlabeled")
    for n in range(32):
        Image.new("RGB", (40, 40), (n * 8, 0, 0)).save(folder / f"{n}.PNG")
    return folder


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """A finished 1-epoch MoCo run, written by moco.train itself (its epoch's training skipped: only the files
    matter here)."""
    out = tmp_path_factory.mktemp("moco")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moco_train, "train_one_epoch", _no_training)
        moco_train.main([str(images), "--output-dir", str(out), "--epochs", "1", *MOCO])
    return out


def _copy_run(pretrained, to):
    shutil.copytree(pretrained, to)
    return to


def test_moco_resume_is_ignored_once_the_run_has_its_own_checkpoint(pretrained, images, tmp_path, monkeypatch):
    other = tmp_path / "other.pth.tar"
    ckpt = checkpoint.load(pretrained / checkpoint.LAST)
    checkpoint.save_atomic({**ckpt, "epoch": 0, "run_id": "0ther"}, other)
    monkeypatch.setattr(moco_train, "train_one_epoch", _no_training)
    # A fresh directory starts from --resume (its first start) ...
    fresh = tmp_path / "fresh"
    moco_train.main([str(images), "--output-dir", str(fresh), "--epochs", "1", "--resume", str(other), *MOCO])
    assert f"resumed from {other} at epoch 0" in (fresh / "train.log").read_text()
    assert checkpoint.load(fresh / checkpoint.LAST)["run_id"] == "0ther"  # the id survives the resume
    # ... a directory with its own checkpoint continues that one: the same command line, requeued.
    run = _copy_run(pretrained, tmp_path / "run")
    moco_train.main([str(images), "--output-dir", str(run), "--epochs", "1", "--resume", str(other), *MOCO])
    log = (run / "train.log").read_text()
    assert f"--resume {other} ignored: {run} already has its own checkpoint {checkpoint.LAST}" in log
    assert f"resumed from {run / checkpoint.LAST} at epoch 1" in log
    assert checkpoint.load(run / checkpoint.LAST)["run_id"] == ckpt["run_id"]


@pytest.mark.parametrize("flags, differences", [
    (["--epochs", "2"], "--epochs 2 (checkpoint: 1)"),  # a finished run is not extended: the schedule would bend
    (["--epochs", "1", "--moco-k", "128", "-a", "resnet34"], "-a resnet34 (checkpoint: resnet18), --moco-k 128 "
                                                            "(checkpoint: 64)"),
], ids=["more-epochs", "other-model"])
def test_moco_refuses_a_checkpoint_of_another_recipe(pretrained, images, tmp_path, flags, differences):
    run = _copy_run(pretrained, tmp_path / "run")
    before = (run / checkpoint.LAST).read_bytes()
    with pytest.raises(SystemExit) as refused:
        moco_train.main([str(images), "--output-dir", str(run), *MOCO, *flags])
    assert str(refused.value) == (f"error: {run / checkpoint.LAST}: written by a run with another recipe: "
                                  f"{differences}. A run continues only with the values it started with: repeat "
                                  f"them, or start this one in another --output-dir")
    assert (run / checkpoint.LAST).read_bytes() == before


HOLDER = """
import sys, time
from moco.runtime.runlock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_run_is_refused_while_the_first_holds_the_directory(images, tmp_path, subprocess_env,
                                                                    monkeypatch):
    moco_dir, stage_dir = tmp_path / "moco", tmp_path / "fpn" / "r2"
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True,
                                env={**subprocess_env, "SLURM_JOB_ID": "4242"}) for d in (moco_dir, stage_dir)]
    try:
        assert [h.stdout.readline() for h in holders] == ["held\n"] * 2
        for holder, directory in zip(holders, (moco_dir, stage_dir)):
            with pytest.raises(ValueError) as refused:
                DirectoryLock(directory).acquire()
            assert str(refused.value).startswith(
                f"{directory} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, "
                f"Slurm job 4242, since ")
        with pytest.raises(SystemExit, match=rf"^error: {moco_dir} is in use by another run \(.*pid "
                                             rf"{holders[0].pid}, Slurm job 4242"):
            moco_train.main([str(images), "--output-dir", str(moco_dir), "--epochs", "1", *MOCO])
        with pytest.raises(SystemExit, match=rf"^error: {stage_dir} is in use by another run \(.*pid "
                                             rf"{holders[1].pid}, Slurm job 4242"):
            demo_train.main(["--stage", "r2", "--dataset-root", str(tmp_path), "--output-dir", str(tmp_path / "fpn")])
        assert not (moco_dir / checkpoint.LAST).exists()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    # The holder died without letting go (SIGKILL): the same Slurm job, requeued, takes the directory again.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = DirectoryLock(stage_dir)
    lock.acquire()
    assert "Slurm job 4242" in lock.path.read_text() and f"pid {holders[1].pid}," not in lock.path.read_text()
    lock.release()


def _with(path, **changes):
    checkpoint.save_atomic({**checkpoint.load(path), **changes}, path)
    return path


def test_r1_refuses_a_backbone_of_unfinished_pretraining(pretrained, tmp_path, capsys):
    finished = pretrained / checkpoint.LAST
    unfinished = _with(_copy_run(pretrained, tmp_path / "moco") / checkpoint.LAST, args={
        **checkpoint.load(finished)["args"], "epochs": 2})
    stage = ["--stage", "r1", "--dataset-root", str(tmp_path), "--output-dir", str(tmp_path / "fpn")]
    with pytest.raises(SystemExit, match=rf"^error: {unfinished}: pretraining stopped at epoch 1 of 2 "):
        demo_train.main([*stage, "--bp", str(unfinished)])
    mid_epoch = _with(Path(shutil.copy(finished, tmp_path / "mid.pth.tar")), step=3)
    with pytest.raises(SystemExit, match=rf"^error: {mid_epoch}: written in the middle of an epoch"):
        demo_train.main([*stage, "--bp", str(mid_epoch)])
    assert not (tmp_path / "fpn" / "r1" / checkpoint.LAST).exists()
    # An epoch chosen by name (a numbered checkpoint written at an epoch's end) is used, with a warning.
    numbered = tmp_path / "moco" / checkpoint.numbered_name(1)
    shutil.copy(unfinished, numbered)
    assert lineage.check_backbone(numbered)["epoch"] == 1
    assert "epoch 1 of a 2-epoch pretraining, chosen by its name" in capsys.readouterr().out
    record = lineage.check_backbone(finished)
    assert (record["run_id"], record["epoch"], record["path"]) == (
        checkpoint.load(finished)["run_id"], 1, str(finished.resolve()))


def test_r1_takes_a_facebookresearch_backbone(tmp_path):
    """Their layout: module.encoder_q.* weights, epoch and arch, no args, no run id."""
    weights = {f"module.encoder_q.{k}": v for k, v in moco_train.build_model(
        moco_train.get_parser().parse_args(["x", *MOCO]), 1).encoder_q.state_dict().items()}
    released = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": weights, "optimizer": {}}, released,
               _use_new_zipfile_serialization=False)  # as torch 1.4 wrote their releases
    record = lineage.check_backbone(released)
    assert record["epoch"] == 800 and record["run_id"].startswith("sha256:")
    assert lineage.check_backbone(released) == record  # a fingerprint: the same file, the same identity


def _stage(run, stage, epoch, end, upstream, run_id):
    """A stage checkpoint's entries the chain checks read (the weights play no part in them)."""
    path = run / stage / checkpoint.LAST
    checkpoint.save_atomic({"model_config": {}, "stage": stage, "epoch": epoch, "stage_end": end, "step": 0,
                            "run_id": run_id, "upstream": upstream}, path)
    return path


@pytest.fixture
def chain(tmp_path):
    """r1 and r2 finished in one run directory, r3 chained from r2, as demo.train records them."""
    run = tmp_path / "fpn"
    r1 = _stage(run, "r1", 23, 23, None, "r1-first")
    r2 = _stage(run, "r2", 27, 27, runs.identity(checkpoint.load(r1), r1), "r2-first")
    r3 = _stage(run, "r3", 30, 37, runs.identity(checkpoint.load(r2), r2), "r3-first")
    return run, r1, r2, r3


def _stage_args(stage, run, *extra):
    return demo_train.get_parser().parse_args(["--stage", stage, "--dataset-root", "unused", "--output-dir",
                                               str(run), *extra])


def test_stage_resume_is_ignored_once_the_stage_has_its_own_checkpoint(chain, tmp_path, capsys):
    run, _, r2, r3 = chain
    setup_logging()
    other = _stage(tmp_path / "elsewhere", "r3", 28, 37, None, "other")
    source, how, upstream, run_id = demo_train.starting_point(_stage_args("r3", run, "--resume", str(other)),
                                                              run / "r3")
    assert (source, how, run_id) == (r3, "resume", "r3-first") and upstream["run_id"] == "r2-first"
    assert f"--resume {other} ignored: {run / 'r3'} already has its own checkpoint" in capsys.readouterr().out


def test_stage_with_an_unreadable_last_checkpoint_continues_from_its_best(chain, capsys):
    run, r1, _, r3 = chain
    setup_logging()
    best = r3.with_name(demo_train.BEST)
    shutil.copy(r3, best)  # written at the same epoch as checkpoint_last, as after a best validation
    r3.write_bytes(r3.read_bytes()[:200])  # truncated
    args = _stage_args("r3", run, "--restart")
    lock = DirectoryLock(run / "r3")
    assert demo_train.claim_stage(args, run / "r3", lock) is None  # judged by its best: r2 is unchanged
    lock.release()
    source, how, upstream, run_id = demo_train.starting_point(args, run / "r3")
    assert (source, how, run_id, upstream["run_id"]) == (best, "resume", "r3-first", "r2-first")
    assert f"{r3}: not a readable checkpoint (" in capsys.readouterr().out
    _stage(run, "r2", 27, 27, runs.identity(checkpoint.load(r1), r1), "r2-second")  # r2 was run again
    with pytest.raises(ValueError, match=rf"^{best}: stage r3 was trained from r2 run r2-first at epoch 27, but "):
        demo_train.starting_point(args, run / "r3")  # the lineage check holds for the file chosen
    best.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as refused:
        demo_train.main(["--stage", "r3", "--dataset-root", "unused", "--output-dir", str(run)])
    message = str(refused.value)
    assert message.startswith(f"error: no readable checkpoint to continue from: {r3}: not a readable checkpoint (")
    assert f"; {best}: not a readable checkpoint (" in message
    assert message.endswith(f"restore one of them, or move {run / 'r3'} aside to start over")


def test_stage_refuses_to_continue_on_a_previous_stage_run_again(chain):
    run, r1, r2, r3 = chain
    _stage(run, "r2", 27, 27, runs.identity(checkpoint.load(r1), r1), "r2-second")  # r2 was run again
    with pytest.raises(SystemExit) as refused:
        demo_train.main(["--stage", "r3", "--dataset-root", "unused", "--output-dir", str(run)])
    assert str(refused.value) == (
        f"error: {r3}: stage r3 was trained from r2 run r2-first at epoch 27, but {r2} now holds r2 run r2-second "
        f"at epoch 27. Continuing stage r3 would mix two runs: start it afresh with --restart (moves {run / 'r3'} "
        f"aside, keeping it), or move {run / 'r3'} away yourself")
    _stage(run, "r2", 28, 28, runs.identity(checkpoint.load(r1), r1), "r2-first")  # r2 continued past r3's start
    with pytest.raises(SystemExit, match="r2 run r2-first at epoch 27, but .* now holds r2 run r2-first at epoch 28"):
        demo_train.main(["--stage", "r3", "--dataset-root", "unused", "--output-dir", str(run)])


def test_r1_refuses_to_continue_on_another_backbone(chain, pretrained):
    run, r1, _, _ = chain
    with pytest.raises(SystemExit, match=rf"{r1}: stage r1 was trained from no backbone \(a random initialisation\)"
                                         rf", but {pretrained / checkpoint.LAST} now holds backbone run "):
        demo_train.main(["--stage", "r1", "--dataset-root", "unused", "--output-dir", str(run), "--bp",
                         str(pretrained / checkpoint.LAST)])


def test_restart_moves_a_stale_stage_aside_and_leaves_a_current_one(chain):
    run, r1, r2, r3 = chain
    lock = DirectoryLock(run / "r3")
    args = _stage_args("r3", run, "--restart")
    assert demo_train.claim_stage(args, run / "r3", lock) is None  # r2 unchanged: a requeue with --restart continues
    assert r3.is_file()
    lock.release()
    _stage(run, "r2", 27, 27, runs.identity(checkpoint.load(r1), r1), "r2-second")
    aside = demo_train.claim_stage(args, run / "r3", lock)
    assert aside.parent == run and aside.name.startswith("r3.replaced-")
    assert checkpoint.load(aside / checkpoint.LAST)["run_id"] == "r3-first"  # kept, out of the chain
    assert not r3.exists()
    with pytest.raises(ValueError, match="is in use by another run"):  # the new directory is held
        DirectoryLock(run / "r3").acquire()
    lock.release()
    source, how, upstream, _ = demo_train.starting_point(args, run / "r3")
    assert (source, how, upstream["run_id"]) == (r2, "chain", "r2-second")


def test_evaluation_refuses_a_checkpoint_whose_chain_was_run_again(chain, tmp_path):
    run, r1, r2, r3 = chain
    lineage.check_chain(r3)  # the chain as trained
    _stage(run, "r1", 23, 23, None, "r1-second")
    with pytest.raises(SystemExit) as refused:
        demo_evaluate.main(["--checkpoint-path", str(r3), "--dataset-root", "unused"])
    assert str(refused.value) == (
        f"error: {r3}: its chain has changed since it was trained: {r2}: stage r2 was trained from r1 run r1-first at "
        f"epoch 23, but {r1} now holds r1 run r1-second at epoch 23. Run stage r2 again from the current r1 "
        f"(demo.train --restart moves the old r2 aside), then the stages after it")
    copy = tmp_path / "kept" / "final.pth.tar"  # outside a run directory there is no chain to judge
    copy.parent.mkdir()
    shutil.copy(r3, copy)
    lineage.check_chain(copy)


RANK = """
import sys
from pathlib import Path
import torch.distributed as dist
from moco.runtime import runs

rank, port, views = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
own = Path(views[rank]) / "checkpoint_last.pth.tar"  # each rank sees its own view of the run directory
answers = [str(runs.decided_by_rank0(lambda: runs.resume_file(own, "given.pth.tar")))]
try:
    runs.decided_by_rank0(lambda: (_ for _ in ()).throw(ValueError(f"refused on rank {rank}")))
except ValueError as exc:
    answers.append(str(exc))
print(rank, answers, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_every_rank_starts_from_the_file_rank_0_chose(tmp_path, subprocess_env):
    """Rank 0 sees a checkpoint_last that rank 1 does not (yet): both continue it; rank 0's refusal is both's."""
    views = [tmp_path / "rank0-view", tmp_path / "rank1-view"]
    for view in views:
        view.mkdir()
    checkpoint.save_atomic({"epoch": 1}, views[0] / checkpoint.LAST)
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, *map(str, views)], env=subprocess_env,
                              cwd=subprocess_env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    chosen = str(views[0] / checkpoint.LAST)
    assert [o.strip().splitlines()[-1] for o in outputs] == [
        f"{rank} {[chosen, 'refused on rank 0']}" for rank in range(2)]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    from moco.course.tinyset import generate

    return generate(tmp_path_factory.mktemp("tiny"), unlabeled=0, train=8, val=4) / "labeled"


SMALL = ["--min-size", "160", "--max-size", "256", "--rois-per-image", "32", "--fpn-channels", "64", "-b", "4",
         "-j", "0", "-p", "0", "--precision", "off", "-a", "resnet18"]


@pytest.mark.slow
def test_a_stage_on_a_rerun_r1_is_refused_until_restarted(pretrained, labeled, tmp_path):
    """The whole story with real stages: r1 -> r2, r1 run again, then r2's requeue and evaluation refuse to mix
    the runs, and --restart starts r2 afresh on the new r1 while keeping the old r2."""
    run = tmp_path / "fpn"

    def stage(name, *extra):
        return demo_train.main(["--stage", name, "--dataset-root", str(labeled), "--output-dir", str(run), *SMALL,
                                *extra])

    r1_flags = ["--bp", str(pretrained / checkpoint.LAST), "--epochs", "1", "--lr", "0.01"]
    stage("r1", *r1_flags)
    stage("r2", "--epochs", "2")
    r1, r2 = (checkpoint.load(run / s / checkpoint.LAST) for s in ("r1", "r2"))
    assert r1["upstream"] == runs.identity(checkpoint.load(pretrained / checkpoint.LAST), pretrained / checkpoint.LAST)
    assert r2["upstream"] == runs.identity(r1, run / "r1" / checkpoint.LAST)

    (run / "r1").rename(tmp_path / "r1-first")  # the user runs r1 again
    stage("r1", *r1_flags)
    rerun = checkpoint.load(run / "r1" / checkpoint.LAST)["run_id"]
    assert rerun != r1["run_id"]
    stale = (rf"{run / 'r2' / checkpoint.LAST}: stage r2 was trained from r1 run {r1['run_id']} at epoch 1, but "
             rf"{run / 'r1' / checkpoint.LAST} now holds r1 run {rerun} at epoch 1")
    with pytest.raises(SystemExit, match=f"^error: {stale}. Continuing stage r2 would mix two runs"):
        stage("r2", "--epochs", "2")
    evaluate = ["--checkpoint-path", str(run / "r2" / checkpoint.LAST), "--dataset-root", str(labeled), "-j", "0"]
    with pytest.raises(SystemExit, match=f"its chain has changed since it was trained: {stale}"):
        demo_evaluate.main(evaluate)

    stage("r2", "--epochs", "2", "--restart")
    [aside] = run.glob("r2.replaced-*")
    assert checkpoint.load(aside / checkpoint.LAST)["run_id"] == r2["run_id"]  # the old r2, kept
    restarted = checkpoint.load(run / "r2" / checkpoint.LAST)
    assert (restarted["epoch"], restarted["upstream"]["run_id"]) == (2, rerun)
    stage("r2", "--epochs", "2", "--restart")  # the same job requeued: continues, nothing more moved aside
    assert list(run.glob("r2.replaced-*")) == [aside]
    assert checkpoint.load(run / "r2" / checkpoint.LAST)["run_id"] == restarted["run_id"]
    assert demo_evaluate.main(evaluate) is not None
