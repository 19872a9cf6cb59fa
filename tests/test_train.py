import json
import math
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moco.batchnorm import SplitBatchNorm2d
from moco.runtime import checkpoint, preemption
from moco.train import build_model, get_parser, learning_rate, main

K = 256


def _args(data, out, *extra):
    # Constant lr for 7 epochs, then a step: the loss falls within those 56 steps, and resuming must restore the
    # schedule. (A cosine schedule decays too early for so short a run.) fp32 on every host: the loss thresholds
    # below were measured in fp32, and --precision auto would pick bf16 on CPUs that have it.
    return [str(data / "train"), "--output-dir", str(out), "-a", "resnet18", "--image-size", "64", "-b", "32",
            "--moco-k", str(K), "--moco-m", "0.99", "--mlp", "--aug-plus", "--schedule", "7", "--moco-t", "0.2",
            "--lr", "0.03", "-j", "0", "--save-freq", "1", "--bn-splits", "4", "--precision", "off", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(_args(tiny_data, out, "--epochs", "8", "--probe-data", str(tiny_data / "labeled"), "--probe-freq", "4"))
    return out


@pytest.mark.slow
def test_loss_falls_once_the_queue_is_full(trained):
    epochs = [m for m in _metrics(trained) if "loss" in m]
    assert [m["epoch"] for m in epochs] == list(range(1, 9))
    # Epoch 1 starts against a random queue (easy negatives); from epoch 2 the queue holds real keys and the
    # loss starts near chance, log(1 + K). The optimiser must then lower it and raise the InfoNCE accuracy.
    # (That the features also serve downstream is the kNN probe's question, not this test's.)
    chance = math.log(1 + K)
    # Judged over the constant-lr epochs: on this tiny set the loss rises again once the lr drops (see the README).
    last = epochs[6]
    assert epochs[1]["loss"] < chance
    assert last["loss"] < epochs[1]["loss"] - 0.15
    assert last["loss"] < chance - 0.3
    assert last["acc1"] > epochs[1]["acc1"] + 15
    assert [m["lr"] for m in epochs] == pytest.approx([0.03] * 7 + [0.003])
    assert all(0.0 < m["key_spread"] <= 1.5 for m in epochs)


def test_learning_rate_schedules():
    args = get_parser().parse_args(["data", "--lr", "0.1", "--epochs", "10", "--schedule", "4", "8"])
    assert [learning_rate(e, args) for e in (0, 3, 4, 7, 8, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    args.cos = True
    assert [learning_rate(e, args) for e in (0, 5)] == pytest.approx([0.1, 0.05])
    assert learning_rate(9, args) < 0.003
    args.warmup_epochs = 2  # linear from 0 over two epochs, under the cosine
    assert [learning_rate(0, args, p) for p in (0.25, 1.0)] == pytest.approx([0.0125, 0.05])
    assert learning_rate(1, args, 0.5) == pytest.approx(0.75 * 0.05 * (1 + math.cos(math.pi / 10)))
    assert learning_rate(2, args, 0.5) == learning_rate(2, args)


@pytest.mark.slow
def test_checkpoint_has_facebookresearch_layout(trained):
    ckpt = checkpoint.load(trained / "checkpoint_0008.pth.tar")
    assert ckpt["epoch"] == 8 and ckpt["arch"] == "resnet18"
    keys = ckpt["state_dict"].keys()
    assert all(k.startswith("module.") for k in keys)
    for key in ("module.encoder_q.conv1.weight", "module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight",
                "module.encoder_k.layer4.1.bn2.running_var", "module.queue", "module.queue_ptr"):
        assert key in keys
    assert ckpt["state_dict"]["module.queue"].shape == (128, K)
    assert {"state", "param_groups"} <= ckpt["optimizer"].keys()
    assert sorted(p.name for p in trained.glob("checkpoint_*")) == [
        *(f"checkpoint_{e:04d}.pth.tar" for e in range(1, 9)), "checkpoint_last.pth.tar"]
    _assert_same_state(ckpt, checkpoint.load(trained / "checkpoint_last.pth.tar"))


@pytest.mark.slow
def test_probe_logged_at_initialisation_and_every_n_epochs(trained):
    probes = {m["epoch"]: m["knn_top1"] for m in _metrics(trained) if "knn_top1" in m}
    assert sorted(probes) == [0, 4, 8]
    assert all(0.0 <= v <= 1.0 for v in probes.values())
    own = {m["epoch"]: m["knn_top1_own_bn"] for m in _metrics(trained) if "knn_top1" in m}
    assert sorted(own) == [0, 4, 8] and all(0.0 <= v <= 1.0 for v in own.values())


@pytest.mark.slow
def test_tensorboard_shows_the_records_by_epoch(trained):
    events = EventAccumulator(str(trained))
    events.Reload()
    records = _metrics(trained)
    for tag, key in (("train/loss", "loss"), ("train/acc1", "acc1"), ("train/key_spread", "key_spread"),
                     ("train/lr", "lr"), ("probe/knn_top1", "knn_top1")):
        expected = [(m["epoch"], m[key]) for m in records if key in m]
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(step, pytest.approx(v)) for step, v in expected]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_final_state(trained, tiny_data, tmp_path):
    # A run stopped after epoch 5 holds checkpoint_last = epoch 5; re-running the same command continues it.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(trained / "checkpoint_0005.pth.tar", resumed / checkpoint.LAST)
    main(_args(tiny_data, resumed, "--epochs", "8", "--probe-data", str(tiny_data / "labeled"), "--probe-freq", "4"))
    resumed_epochs = _metrics(resumed)
    assert [m["epoch"] for m in resumed_epochs] == [6, 7, 8]  # epochs 1-5 were not trained again
    assert [m["lr"] for m in resumed_epochs] == pytest.approx([0.03, 0.03, 0.003])
    final, reference = checkpoint.load(resumed / checkpoint.LAST), checkpoint.load(trained / checkpoint.LAST)
    _assert_same_state(final["state_dict"], reference["state_dict"])
    _assert_same_state(final["optimizer"], reference["optimizer"])
    # --resume PATH does the same from an explicit file, into a new directory.
    explicit = tmp_path / "explicit"
    main(_args(tiny_data, explicit, "--epochs", "8", "--resume", str(trained / "checkpoint_0007.pth.tar")))
    _assert_same_state(checkpoint.load(explicit / checkpoint.LAST)["state_dict"], reference["state_dict"])


def _stop_at_call(monkeypatch, n: int):
    """A stop request that arrives before the n-th step of the run, as a signal would."""
    calls = []

    def stop_requested(*args, **kwargs):
        calls.append(1)
        return len(calls) == n

    monkeypatch.setattr(preemption, "stop_requested", stop_requested)


@pytest.mark.slow
def test_run_stopped_mid_epoch_resumes_from_that_step_to_the_same_final_state(trained, tiny_data, tmp_path,
                                                                             monkeypatch):
    run = tmp_path / "stopped"
    run.mkdir()
    shutil.copy(trained / "checkpoint_0005.pth.tar", run / checkpoint.LAST)
    _stop_at_call(monkeypatch, 3)  # epoch 6 (index 5), after its steps 0 and 1
    with pytest.raises(SystemExit) as stop:
        main(_args(tiny_data, run, "--epochs", "8"))
    assert stop.value.code == preemption.EXIT_REQUEUE
    mid = checkpoint.load(run / checkpoint.LAST)
    assert (mid["epoch"], mid["step"]) == (5, 2)
    assert not (run / "metrics.jsonl").exists()  # no epoch was completed
    monkeypatch.undo()
    main(_args(tiny_data, run, "--epochs", "8"))
    assert [m["epoch"] for m in _metrics(run)] == [6, 7, 8]
    final, reference = checkpoint.load(run / checkpoint.LAST), checkpoint.load(trained / checkpoint.LAST)
    assert final["step"] == 0
    # The two skipped batches were not trained twice and the key shuffle continued: bit-identical.
    _assert_same_state(final["state_dict"], reference["state_dict"])
    _assert_same_state(final["optimizer"], reference["optimizer"])


@pytest.mark.slow
def test_finished_run_rerun_trains_nothing(trained, tiny_data):
    before = (trained / checkpoint.LAST).stat().st_mtime_ns
    main(_args(tiny_data, trained, "--epochs", "8"))
    assert (trained / checkpoint.LAST).stat().st_mtime_ns == before


def test_missing_data_or_checkpoint_is_a_one_line_error(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nowhere: no such directory"):
        main([str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), "-a", "resnet18", "--moco-k", "256"])
    with pytest.raises(SystemExit, match=r"error: .*gone.pth.tar: no such checkpoint"):
        main(_args(tiny_data, tmp_path / "run", "--epochs", "1", "--resume", str(tmp_path / "gone.pth.tar")))


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-3"), ("-b", "0"), ("--moco-k", "0")])
def test_a_request_that_trains_nothing_is_refused_before_anything_starts(tmp_path, capsys, flag, value):
    """--epochs 0 used to exit 0 with no checkpoint and no message. The data path does not exist: the refusal
    comes first, with argparse's usage status, and no output directory is made."""
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), flag, value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"{value}: at least 1, or nothing would train")
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_is_refused_with_the_usage_status(tiny_data, tmp_path, capsys):
    """It exited 1, as an error to fix in the data would; it is a request that cannot train, refused as --epochs 0
    is, before any model is built."""
    with pytest.raises(SystemExit) as stop:
        main(_args(tiny_data, tmp_path, "--epochs", "1", "-b", "512", "--moco-k", "512"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("256 images cannot fill one batch of 512")
    assert not (tmp_path / checkpoint.LAST).exists()


def test_queue_not_multiple_of_batch_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="--moco-k 100 must be a multiple of --batch-size 32"):
        main(_args(tiny_data, tmp_path, "--epochs", "1", "--moco-k", "100"))


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(trained, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=r"another recipe: -a resnet34 \(checkpoint: resnet18\)\. "):
        main(_args(tiny_data, tmp_path, "--epochs", "8", "-a", "resnet34",
                   "--resume", str(trained / checkpoint.LAST)))


def test_split_bn_only_in_a_single_process():
    args = get_parser().parse_args(["data", "-a", "resnet18", "--moco-k", "64", "--bn-splits", "4"])
    single, ddp = build_model(args, world_size=1), build_model(args, world_size=2)
    assert any(isinstance(m, SplitBatchNorm2d) for m in single.encoder_k.modules())
    assert not any(isinstance(m, SplitBatchNorm2d) for m in ddp.modules())


def test_a_moco_step_reads_nothing_back_from_the_device(monkeypatch):
    """On the meta device any read to the host (.item(), int(), a comparison in Python) raises: the step of
    pretraining (forward with the key shuffle and the queue, loss, the non-finite watch, the update) never makes the
    host wait for a GPU. Autocast has no meta backend, so it is the one piece left out."""
    import contextlib

    from moco.augment import Normalize
    from moco.runtime import failures
    from moco.train import describe_logits, moco_step

    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    args = get_parser().parse_args(["-", "-a", "resnet18", "--moco-k", "32", "--mlp", "-b", "16"])
    meta = torch.device("meta")
    model = build_model(args, 1, Normalize()).to(meta)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    watch = failures.LossWatch(meta, 4, describe_logits)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for step in range(3):  # the queue wraps: K 32, batch 16
        moco_step(model, images, images, optimizer, None, None, meta, watch, step)
    assert model._ptr == 16


def test_the_queue_position_is_read_again_after_a_load():
    """The host keeps the queue's position; a resumed run's comes from its checkpoint's queue_ptr."""
    args = get_parser().parse_args(["-", "-a", "resnet18", "--moco-k", "32", "--moco-dim", "8"])
    model = build_model(args, 1)
    model._dequeue_and_enqueue(torch.randn(16, 8))
    state = model.state_dict()
    fresh = build_model(args, 1)
    fresh.load_state_dict(state)
    fresh._dequeue_and_enqueue(torch.ones(16, 8))
    assert int(fresh.queue_ptr) == 0 and torch.equal(fresh.queue[:, 16:], torch.ones(8, 16))
