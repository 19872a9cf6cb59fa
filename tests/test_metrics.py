"""metrics.jsonl and TensorBoard from one writer: records in the trainers' own format, read back as TensorBoard
reads them."""
import json
import logging
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moco.runtime.metrics import MetricsWriter, read_metrics

# Records as moco.train and demo.train write them (keys copied from a `make demo` run).
PROBE_AT_INIT = {"epoch": 0, "knn_top1": 0.30, "knn_top1_own_bn": 0.42}
PRETRAINING = {"epoch": 2, "lr": 0.0072, "loss": 5.92, "acc1": 6.05, "images_per_s": 21.5, "unreadable_images": 0,
               "key_spread": 0.32, "knn_top1": 0.39, "knn_top1_own_bn": 0.33}
VAL = {"AP": 0.017, "AP50": 0.067, "AP75": 0.0021, "APs": 0.0091, "APm": 0.030, "APl": 0.038, "AR1": 0.070,
       "AR10": 0.13, "AR100": 0.15, "ARs": 0.082, "ARm": 0.20, "ARl": 0.22}
FINE_TUNING = {"epoch": 4, "stage": "r2", "lr": 0.001, "loss": 1.46, "loss_box_reg": 0.59, "loss_classifier": 0.63,
               "loss_objectness": 0.17, "loss_rpn_box_reg": 0.07, "images_per_s": 2.7, "unreadable_images": 1,
               "val": VAL}


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_scalars(actual: dict, expected: dict) -> None:
    """Same tags, same steps, the same values to float32 (TensorBoard's precision)."""
    assert sorted(actual) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in actual[tag]] == [step for step, _ in points], tag
        assert [value for _, value in actual[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def event_files(run_dir) -> list:
    return list(run_dir.glob("events.out.tfevents.*"))


def test_pretraining_records_go_to_jsonl_and_tensorboard_with_the_epoch_as_step(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(PROBE_AT_INIT)
        writer.write(PRETRAINING)
    assert read_metrics(tmp_path / "metrics.jsonl") == [PROBE_AT_INIT, PRETRAINING]
    assert_scalars(scalars(tmp_path), {
        "probe/knn_top1": [(0, 0.30), (2, 0.39)], "probe/knn_top1_own_bn": [(0, 0.42), (2, 0.33)],
        "train/lr": [(2, 0.0072)], "train/loss": [(2, 5.92)], "train/acc1": [(2, 6.05)],
        "train/images_per_s": [(2, 21.5)], "train/unreadable_images": [(2, 0)], "train/key_spread": [(2, 0.32)]})


def test_fine_tuning_losses_by_component_and_validation_go_under_their_groups(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(FINE_TUNING)
    expected = {f"val/{name}": [(4, value)] for name, value in VAL.items()}
    expected.update({f"train/{name}": [(4, FINE_TUNING[name])] for name in (
        "lr", "loss", "loss_box_reg", "loss_classifier", "loss_objectness", "loss_rpn_box_reg", "images_per_s",
        "unreadable_images")})
    assert_scalars(scalars(tmp_path), expected)  # the stage's name is text, not a scalar


def test_each_record_is_readable_before_the_writer_closes(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(PRETRAINING)
    try:  # tensorboard watching a live run sees the epoch at once
        assert scalars(tmp_path)["train/loss"] == [(2, pytest.approx(5.92))]
    finally:
        writer.close()


def test_no_event_file_before_the_first_record(tmp_path):
    with MetricsWriter(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_other_ranks_write_nothing(tmp_path):
    with MetricsWriter(tmp_path, rank=1) as writer:
        writer.write(PRETRAINING)
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_metrics_jsonl_is_written_after_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="moco.runtime.metrics"), MetricsWriter(tmp_path) as writer:
        writer.write(PROBE_AT_INIT)
        writer.write(PRETRAINING)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        PROBE_AT_INIT, PRETRAINING]
    assert event_files(tmp_path) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0]


def test_a_line_still_being_written_is_passed_over(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(PROBE_AT_INIT) + "\n" + json.dumps(PRETRAINING)[:30])
    with caplog.at_level(logging.WARNING, logger="moco.runtime.metrics"):
        assert read_metrics(path) == [PROBE_AT_INIT]
    assert f"{path}:2" in caplog.text
