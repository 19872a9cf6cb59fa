"""demo.plots: figures from metrics.jsonl files in the trainers' own format, with parts of a run missing."""
import json

import pytest
from PIL import Image

from demo.plots import finetuning_figure, latest_per_epoch, load_run, main, pretraining_figure, stage_boundaries

# Keys as moco.train and demo.train write them (copied from a `make demo` run); values made up.
PRETRAINING = [
    {"epoch": 0, "knn_top1": 0.30, "knn_top1_own_bn": 0.42},
    *({"epoch": e, "lr": 0.0075 / e, "loss": 6.0 - 0.1 * e, "acc1": 3.0 * e, "images_per_s": 40.0 + e,
       "unreadable_images": 0, "key_spread": 0.3 + 0.05 * e} for e in range(1, 5)),
]
PRETRAINING[2].update(knn_top1=0.39, knn_top1_own_bn=0.33)
PRETRAINING[4].update(knn_top1=0.41, knn_top1_own_bn=0.39)
STAGE_EPOCHS = {"r1": (1, 2, 3), "r2": (4, 5), "r3": (6,)}
STAGE_LR = {"r1": 0.01, "r2": 0.001, "r3": 0.0001}


def fine_tuning_record(stage: str, epoch: int) -> dict:
    lr = 1e-05 if epoch == 1 else STAGE_LR[stage]  # r1's first epoch logs the warm-up's first lr
    val = {name: 0.01 * epoch * factor for name, factor in
           (("AP", 1.0), ("AP50", 2.0), ("AP75", 0.8), ("APs", 0.5), ("APm", 1.4), ("APl", 2.0), ("AR1", 1.3),
            ("AR10", 2.5), ("AR100", 3.0), ("ARs", 1.6), ("ARm", 3.8), ("ARl", 4.0))}
    return {"epoch": epoch, "stage": stage, "lr": lr, "loss": 2.5 - 0.2 * epoch, "loss_box_reg": 0.7 - 0.02 * epoch,
            "loss_classifier": 1.2 - 0.1 * epoch, "loss_objectness": 0.4 - 0.04 * epoch,
            "loss_rpn_box_reg": 0.12 - 0.01 * epoch, "images_per_s": 2.0, "unreadable_images": 0, "val": val}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def run(tmp_path):
    """A run as `make demo` leaves it: moco/ and fpn/r1..r3."""
    write_jsonl(tmp_path / "moco" / "metrics.jsonl", PRETRAINING)
    for stage, epochs in STAGE_EPOCHS.items():
        write_jsonl(tmp_path / "fpn" / stage / "metrics.jsonl", [fine_tuning_record(stage, e) for e in epochs])
    return tmp_path


def line(ax, label):
    (found,) = [line for line in ax.get_lines() if line.get_label() == label]
    return list(found.get_xdata()), list(found.get_ydata())


def vertical_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if len(set(line.get_xdata())) == 1]


def test_figures_are_pngs_of_the_expected_size_and_not_blank(run):
    written = main([str(run)])
    assert written == [run / "plots" / "pretraining.png", run / "plots" / "finetuning.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1000, 700)
            assert len(image.convert("RGB").getcolors(1 << 20)) > 50  # curves, text, antialiasing: not a blank page


def test_out_puts_the_figures_elsewhere(run, tmp_path):
    assert main([str(run), "--out", str(tmp_path / "figures")]) == [
        tmp_path / "figures" / "pretraining.png", tmp_path / "figures" / "finetuning.png"]


def test_pretraining_panels_hold_the_records_by_epoch():
    fig = pretraining_figure(PRETRAINING)
    loss, accuracy, spread, knn = fig.axes[:4]
    assert line(loss, "InfoNCE loss") == ([1, 2, 3, 4], pytest.approx([5.9, 5.8, 5.7, 5.6]))
    assert accuracy.get_lines()[0].get_ydata().tolist() == pytest.approx([3.0, 6.0, 9.0, 12.0])
    assert line(spread, "key spread") == ([1, 2, 3, 4], pytest.approx([0.35, 0.4, 0.45, 0.5]))
    assert line(knn, "BatchNorm estimated on the crops") == ([0, 2, 4], pytest.approx([30.0, 39.0, 41.0]))
    assert line(knn, "BatchNorm as held") == ([0, 2, 4], pytest.approx([42.0, 33.0, 39.0]))
    (lr_axis,) = [ax for ax in fig.axes if ax.get_ylabel() == "lr"]
    assert lr_axis.get_yscale() == "log"
    assert line(lr_axis, "lr")[1] == pytest.approx([0.0075, 0.0075, 0.00375, 0.0025, 0.001875])


def test_stage_boundaries_are_the_epochs_later_stages_start_from(run):
    _, stages = load_run(run)
    assert list(stages) == ["r1", "r2", "r3"]
    assert stage_boundaries(stages) == [(3, "r2"), (5, "r3")]


def test_fine_tuning_curves_run_across_the_stages_with_boundaries_and_the_lr(run):
    _, stages = load_run(run)
    fig = finetuning_figure(stages)
    losses, val = fig.axes[:2]
    for ax in (losses, val):
        assert vertical_lines(ax) == [3, 5]
    assert [text.get_text() for text in losses.texts] == ["r1", "r2", "r3"]
    assert line(losses, "loss") == ([1, 2, 3, 4, 5, 6], pytest.approx([2.3, 2.1, 1.9, 1.7, 1.5, 1.3]))
    assert line(losses, "classifier")[1] == pytest.approx([1.1, 1.0, 0.9, 0.8, 0.7, 0.6])
    assert line(val, "AP") == ([1, 2, 3, 4, 5, 6], pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    assert line(val, "AP50")[1] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.12])
    (lr_axis,) = [ax for ax in fig.axes if ax.get_ylabel() == "lr"]
    assert lr_axis.get_yscale() == "log"
    # Each epoch's lr drawn over that epoch, from the start of r1 (epoch 0).
    assert line(lr_axis, "lr") == ([0, 1, 2, 3, 4, 5, 6], pytest.approx([1e-5, 1e-5, 0.01, 0.01, 1e-3, 1e-3, 1e-4]))


def test_a_stage_not_run_yet_is_left_out_with_a_log_line(run, capsys):
    (run / "fpn" / "r3" / "metrics.jsonl").unlink()
    assert main([str(run)])[-1] == run / "plots" / "finetuning.png"
    assert "stage r3: no records" in capsys.readouterr().out  # main's logging goes to stdout
    _, stages = load_run(run)
    assert list(stages) == ["r1", "r2"] and stage_boundaries(stages) == [(3, "r2")]
    assert vertical_lines(finetuning_figure(stages).axes[0]) == [3]


def test_a_run_without_pretraining_draws_fine_tuning_alone(run, capsys):
    for path in (run / "moco").iterdir():
        path.unlink()
    assert main([str(run)]) == [run / "plots" / "finetuning.png"]
    assert "no pretraining records" in capsys.readouterr().out


def test_either_trainers_output_dir_is_a_run_too(run, tmp_path):
    assert main([str(run / "moco"), "--out", str(tmp_path / "a")]) == [tmp_path / "a" / "pretraining.png"]
    assert main([str(run / "fpn"), "--out", str(tmp_path / "b")]) == [tmp_path / "b" / "finetuning.png"]
    _, stages = load_run(run / "fpn" / "r2")  # a stage directory: its records name their stage
    assert list(stages) == ["r2"]


def test_no_records_is_a_one_line_error_naming_the_directory(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path)])
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith(f"{tmp_path}: ") and "\n" not in message  # status 1
    assert list(tmp_path.iterdir()) == []


def test_an_epoch_written_twice_is_drawn_once_from_its_last_record():
    again = {**PRETRAINING[0], "knn_top1": 0.31}  # a run started afresh over an old metrics.jsonl
    assert latest_per_epoch([*PRETRAINING, again]) == [again, *PRETRAINING[1:]]
