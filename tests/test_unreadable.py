"""Unreadable images: a training sample's is replaced, logged once and counted per epoch, up to --max-unreadable
(then exit 65 with a mid-epoch checkpoint); validation's, evaluation's and the kNN probe's end the run in one line."""
import json
import logging
import shutil

import pytest
import torch
from test_data import truncate_png
from test_stop_agreement import run_two_ranks
from test_train import _assert_same_state, _stop_at_call

from demo import evaluate as demo_evaluate
from demo import train as demo_train
from moco import train as moco_train
from moco.course.images import UnreadableImage
from moco.data import EpochSampler
from moco.runtime import checkpoint
from moco.runtime.unreadable import EXIT_DATAERR, TooManyUnreadable, UnreadableFiles, first_readable
from moco.runtime.workers import DataLoader, original_message

MOCO = ["-a", "resnet18", "--image-size", "32", "-b", "8", "--moco-k", "16", "--mlp", "--bn-splits", "2",
        "--precision", "off", "-p", "0"]
# demo.train as tests/test_demo_train.py runs it; a small lr: the detector starts from random weights here.
DEMO = ["--min-size", "160", "--max-size", "256", "--rois-per-image", "32", "--fpn-channels", "64", "-b", "4",
        "-p", "0", "--val-batch-size", "4", "--precision", "off", "-a", "resnet18", "--lr", "0.001"]
IMAGES, BATCH = 32, 8


def _read(bad: set[int]):
    def read(index):
        if index in bad:
            raise UnreadableImage(f"{index}.PNG: cannot read image: broken")
        return f"image {index}"
    return read


def test_replacement_is_the_next_readable_index_looking_at_most_one_past_the_ceiling():
    assert first_readable(_read({8, 9, 0}), 8, 10, limit=2) == ("image 1", 8, "8.PNG: cannot read image: broken")
    assert first_readable(_read({8, 9, 0}), 7, 10, limit=2) == ("image 7", -1, "")
    assert first_readable(_read({8}), 8, 10, limit=0) == ("image 9", 8, "8.PNG: cannot read image: broken")
    with pytest.raises(UnreadableImage, match=r"^8\.PNG: cannot read image: broken; nor can any of the 2 images"):
        first_readable(_read({8, 9, 0}), 8, 10, limit=1)
    with pytest.raises(UnreadableImage, match="nor can any of the 2 images"):  # all of them, wrapping once
        first_readable(_read({0, 1, 2}), 1, 3, limit=100)


def test_each_file_is_logged_once_counted_per_epoch_and_the_ceiling_stops_at_its_step(caplog):
    files = UnreadableFiles(ceiling=2, device=torch.device("cpu"))
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        files.start_epoch()
        files.update(0, [-1, 4, -1], ["", "4.PNG: cannot read image: truncated", ""])
        files.update(1, [9, -1, 4], ["9.PNG: cannot read image: empty", "", "4.PNG: cannot read image: truncated"])
        assert files.epoch_count() == 2
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "4.PNG: cannot read image: truncated", "9.PNG: cannot read image: empty"]
    with pytest.raises(TooManyUnreadable) as stop:
        files.update(2, [1], ["1.PNG: cannot read image: not an image"])
    assert stop.value.step == 2
    assert str(stop.value).startswith("3 training images cannot be read, more than --max-unreadable 2:\n"
                                      "  1.PNG: cannot read image: not an image\n"
                                      "  4.PNG: cannot read image: truncated\n"
                                      "  9.PNG: cannot read image: empty\n")
    assert "python -m demo.check" in str(stop.value) and "raise --max-unreadable" in str(stop.value)


def test_max_unreadable_is_a_count():
    assert moco_train.get_parser().parse_args(["data"]).max_unreadable == 100
    assert demo_train.get_parser().parse_args(["--stage", "r1", "--dataset-root", "d",
                                               "--max-unreadable", "0"]).max_unreadable == 0
    with pytest.raises(SystemExit):
        moco_train.get_parser().parse_args(["data", "--max-unreadable", "-1"])


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise UnreadableImage("/data/7.JPEG: cannot read image: image file is truncated")


def test_a_worker_error_reads_in_one_line():
    with pytest.raises(UnreadableImage) as raised:
        next(iter(DataLoader(_Unreadable(), num_workers=1)))
    assert "Traceback" in str(raised.value)  # what torch re-raises: the worker's whole traceback
    assert original_message(raised.value) == "/data/7.JPEG: cannot read image: image file is truncated"


RANK = """
import sys
import torch
import torch.distributed as dist
from moco.runtime.unreadable import TooManyUnreadable, UnreadableFiles

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
files = UnreadableFiles(ceiling=2, device=torch.device("cpu"))
files.start_epoch()
# Two files at step 0, one on each rank: the ceiling. Rank 1 alone finds a third at step 3, and one it already had.
found = {0: {0: [7]}, 1: {0: [5], 3: [6, 5]}}[rank]
stopped = None
for step in range(25):
    try:
        files.update(step, found.get(step, []), [f"{i}.PNG: cannot read image" for i in found.get(step, [])])
    except TooManyUnreadable as stop:
        stopped = (stop.step, sorted(files.agreed))
        break
print(rank, stopped, files.epoch_count(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_stop_together_at_the_next_poll_and_sum_the_epoch(tmp_path, subprocess_env):
    # Step 3 is not a poll: both stop at step 10 (POLL_STEPS), knowing all three files; the epoch has 1 + 2.
    assert run_two_ranks(RANK, tmp_path, subprocess_env) == ["0 (10, [5, 6, 7]) 3", "1 (10, [5, 6, 7]) 3"]


def _first_epoch_order() -> list[int]:
    return [index for _, index in EpochSampler(IMAGES)]


@pytest.fixture(scope="module")
def unlabeled(tiny_data, tmp_path_factory):
    """32 unlabeled images, one truncated: the one the first epoch draws at its step 2."""
    folder = tmp_path_factory.mktemp("unlabeled")
    for n in range(IMAGES):
        shutil.copy(tiny_data / "train" / "unlabeled" / f"{n}.PNG", folder)
    truncate_png(folder / f"{_first_epoch_order()[2 * BATCH]}.PNG")
    return folder


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(unlabeled, tmp_path_factory):
    out = tmp_path_factory.mktemp("moco")
    moco_train.main([str(unlabeled), "--output-dir", str(out), "--epochs", "2", "-j", "0", *MOCO])
    return out


@pytest.mark.slow
def test_pretraining_replaces_logs_once_and_counts_per_epoch(pretrained, unlabeled):
    bad = unlabeled / f"{_first_epoch_order()[2 * BATCH]}.PNG"
    assert [m["unreadable_images"] for m in _metrics(pretrained / "metrics.jsonl")] == [1, 1]
    warnings = [line for line in (pretrained / "train.log").read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"{bad}: cannot read image: image file is truncated" in warnings[0]


@pytest.mark.slow
def test_resumed_with_workers_ends_bit_identical(pretrained, unlabeled, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _stop_at_call(monkeypatch, 2)  # before step 1: the unreadable file comes after the resume
    with pytest.raises(SystemExit):
        moco_train.main([str(unlabeled), "--output-dir", str(run), "--epochs", "2", "-j", "0", *MOCO])
    assert checkpoint.load(run / checkpoint.LAST)["step"] == 1
    monkeypatch.undo()
    moco_train.main([str(unlabeled), "--output-dir", str(run), "--epochs", "2", "-j", "2", *MOCO])
    assert [m["unreadable_images"] for m in _metrics(run / "metrics.jsonl")] == [1, 1]
    final, reference = checkpoint.load(run / checkpoint.LAST), checkpoint.load(pretrained / checkpoint.LAST)
    _assert_same_state(final["state_dict"], reference["state_dict"])
    _assert_same_state(final["optimizer"], reference["optimizer"])


@pytest.mark.slow
def test_past_the_ceiling_the_run_stops_with_a_checkpoint_and_exit_65(tiny_data, tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for n in range(IMAGES):
        shutil.copy(tiny_data / "train" / "unlabeled" / f"{n}.PNG", folder)
    order = _first_epoch_order()
    bad = [folder / f"{order[3]}.PNG", folder / f"{order[BATCH + 5]}.PNG"]  # one at step 0, one at step 1
    truncate_png(bad[0])
    bad[1].write_bytes(b"")
    run = tmp_path / "run"
    args = [str(folder), "--output-dir", str(run), "--epochs", "1", "-j", "0", "--max-unreadable", "1", *MOCO]
    with pytest.raises(SystemExit) as stop:
        moco_train.main(args)
    assert stop.value.code == EXIT_DATAERR == 65
    mid = checkpoint.load(run / checkpoint.LAST)
    assert (mid["epoch"], mid["step"]) == (0, 1)
    log = (run / "train.log").read_text()
    assert "2 training images cannot be read, more than --max-unreadable 1:\n" in log
    assert all(f"\n  {path}: cannot read image: " in log for path in bad)
    # Fixed, the data trains on from that step.
    for path in bad:
        shutil.copy(tiny_data / "train" / "unlabeled" / path.name, path)
    moco_train.main(args)
    assert "at epoch 0 step 1 of 1 epochs" in (run / "train.log").read_text()
    assert [m["unreadable_images"] for m in _metrics(run / "metrics.jsonl")] == [0]


@pytest.fixture(scope="module")
def labeled(tiny_data, tmp_path_factory):
    """8 training images (training image 3 truncated after its header) and 4 validation images."""
    root = tmp_path_factory.mktemp("labeled")
    for split, count in (("training", 8), ("validation", 4)):
        source = tiny_data / "labeled" / split
        numbers = sorted(int(p.stem) for p in (source / "images").iterdir())[:count]
        for sub, ext in (("images", "JPEG"), ("labels", "yml")):
            (root / split / sub).mkdir(parents=True)
            for n in numbers:
                shutil.copy(source / sub / f"{n}.{ext}", root / split / sub)
    _truncate_jpeg(root / "training" / "images" / "3.JPEG")
    return root


def _truncate_jpeg(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _with_bad_validation_image(labeled, to):
    shutil.copytree(labeled, to)
    bad = min((to / "validation" / "images").iterdir(), key=lambda p: int(p.stem))
    _truncate_jpeg(bad)
    return bad


def test_an_unreadable_probe_image_is_one_error_line(unlabeled, labeled, tmp_path):
    bad = labeled / "training" / "images" / "3.JPEG"  # the probe reads labeled images as they are
    with pytest.raises(SystemExit, match=rf"^error: {bad}: cannot read image: image file is truncated[^\n]*$"):
        moco_train.main([str(unlabeled), "--output-dir", str(tmp_path / "run"), "--epochs", "1", "-j", "0",
                         "--probe-data", str(labeled), *MOCO])


@pytest.fixture(scope="module")
def finetuned(labeled, tmp_path_factory):
    out = tmp_path_factory.mktemp("fpn")
    demo_train.main(["--stage", "r1", "--dataset-root", str(labeled), "--output-dir", str(out), "--epochs", "1",
                     "-j", "0", *DEMO])
    return out / "r1"


@pytest.mark.slow
def test_fine_tuning_replaces_and_counts_an_unreadable_training_image(finetuned, labeled):
    bad = labeled / "training" / "images" / "3.JPEG"
    assert [m["unreadable_images"] for m in _metrics(finetuned / "metrics.jsonl")] == [1]
    warnings = [line for line in (finetuned / "train.log").read_text().splitlines() if f"{bad}:" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "replaced by the next readable image" in warnings[0]


@pytest.mark.slow
def test_an_unreadable_validation_image_is_one_error_line(finetuned, labeled, tmp_path):
    root = tmp_path / "labeled"
    bad = _with_bad_validation_image(labeled, root)
    one_line = rf"^error: {bad}: cannot read image: image file is truncated[^\n]*$"
    with pytest.raises(SystemExit, match=one_line):  # read by a worker: torch re-raises it with its traceback
        demo_train.main(["--stage", "r1", "--dataset-root", str(root), "--output-dir", str(tmp_path / "fpn"),
                         "--epochs", "1", "-j", "1", *DEMO])
    with pytest.raises(SystemExit, match=one_line):
        demo_evaluate.main(["--checkpoint-path", str(finetuned / checkpoint.LAST), "--dataset-root", str(root),
                            "-j", "1", "--output-dir", str(tmp_path / "eval")])
