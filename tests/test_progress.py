"""The epoch's progress: redrawn in place on a terminal, periodic log lines in a Slurm log or a pipe."""
import io
import itertools
import logging

import pytest

from moco.runtime import progress as progress_module
from moco.runtime.logger import setup_logging
from moco.runtime.progress import EpochProgress

log = logging.getLogger("test.progress")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


@pytest.fixture
def clock(monkeypatch):
    """Each reading of the clock is one second after the previous one: a step a second."""
    ticks = itertools.count()
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: float(next(ticks)))


def run_epoch(stream, steps=4, first_step=0, print_freq=2, images=8) -> list[int]:
    """Steps as a trainer makes them; returns the steps at which the details were read."""
    bar = EpochProgress(log, epoch=3, steps=steps, first_step=first_step, print_freq=print_freq, stream=stream)
    read = []
    for step in range(first_step, steps):
        bar.update(step, images, lambda: read.append(step) or f"loss {step / 10:.4f}")
    return read


def test_a_pipe_gets_the_periodic_log_lines_and_no_redrawn_line(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        read = run_epoch(stream, steps=5)
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 3 step 0/5 loss 0.0000", "epoch 3 step 2/5 loss 0.2000", "epoch 3 step 4/5 loss 0.4000"]
    assert all(r.console for r in caplog.records)
    assert read == [0, 2, 4]  # the loss may wait for the device: read only where a line shows it


def test_a_terminal_gets_a_line_redrawn_in_place_with_speed_and_time_left(clock, caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        run_epoch(stream, steps=4, print_freq=2, images=8)
    draws = stream.getvalue().split("\r\x1b[K")
    assert draws[0] == "" and "\n" not in stream.getvalue()
    # The clock is read once at the start and once a step: a step a second, 8 images a step.
    assert draws[1:] == ["epoch 3 step 1/4 8.0 img/s ETA 0:00:03 loss 0.0000",
                         "epoch 3 step 2/4 8.0 img/s ETA 0:00:02 loss 0.0000",
                         "epoch 3 step 3/4 8.0 img/s ETA 0:00:01 loss 0.2000",
                         "epoch 3 step 4/4 8.0 img/s ETA 0:00:00 loss 0.2000"]
    # The periodic lines still reach train.log, not the terminal.
    assert [(r.getMessage(), r.console) for r in caplog.records] == [
        ("epoch 3 step 0/4 loss 0.0000", False), ("epoch 3 step 2/4 loss 0.2000", False)]


def test_time_left_counts_only_the_steps_run_since_a_mid_epoch_resume(clock):
    stream = Terminal()
    run_epoch(stream, steps=10, first_step=6, print_freq=0, images=4)
    assert stream.getvalue().split("\r\x1b[K")[1] == "epoch 3 step 7/10 4.0 img/s ETA 0:00:03"


def test_redraws_are_spaced_but_the_last_step_is_always_drawn(monkeypatch):
    now = iter([0.0, 0.01, 0.02, 0.03, 0.04])  # start, then 4 fast steps
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(now))
    stream = Terminal()
    run_epoch(stream, steps=4, print_freq=0)
    assert [draw.split(" img/s")[0] for draw in stream.getvalue().split("\r\x1b[K")[1:]] == [
        "epoch 3 step 1/4 800.0", "epoch 3 step 4/4 800.0"]


def test_the_line_is_cut_to_the_terminal_width_so_it_never_wraps(clock, monkeypatch):
    monkeypatch.setenv("COLUMNS", "20")
    stream = Terminal()
    run_epoch(stream)
    assert {len(draw) for draw in stream.getvalue().split("\r\x1b[K")[1:]} == {19}


def test_other_ranks_draw_nothing_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "_rank", lambda: 1)
    stream = Terminal()
    run_epoch(stream)
    assert stream.getvalue() == ""


def test_lines_kept_off_the_console_still_reach_the_log_file(tmp_path, capsys):
    setup_logging(0, tmp_path / "train.log")
    try:
        log.info("epoch 3 step 2/4 loss 0.2000", extra={"console": False})
        log.info("epoch 3/8 done")
    finally:
        setup_logging(0)  # closes the file handler
    out = capsys.readouterr().out
    assert "epoch 3/8 done" in out and "step 2/4" not in out
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["epoch 3 step 2/4 loss 0.2000", "epoch 3/8 done"]


def test_on_a_terminal_a_log_line_replaces_the_redrawn_line_instead_of_continuing_it(monkeypatch):
    terminal, pipe = Terminal(), io.StringIO()
    for stdout in (terminal, pipe):
        monkeypatch.setattr("sys.stdout", stdout)
        setup_logging(0)
        log.info("epoch 3/8 done")
    setup_logging(0)
    assert terminal.getvalue().startswith("\r\x1b[K") and terminal.getvalue().endswith("epoch 3/8 done\n")
    assert pipe.getvalue()[0].isdigit()  # the time: nothing to clear in a Slurm log


def test_the_line_is_redrawn_on_the_consoles_stream_the_logger_clears(monkeypatch):
    """A terminal on stdout (the console log's stream) gets the line, whatever stderr is; a piped stdout gets none."""
    for stdout, stderr in ((Terminal(), io.StringIO()), (io.StringIO(), Terminal())):
        monkeypatch.setattr("sys.stdout", stdout)
        monkeypatch.setattr("sys.stderr", stderr)
        bar = EpochProgress(log, epoch=3, steps=2, print_freq=0)
        bar.update(0, 8, lambda: "")
        assert bar.live == stdout.isatty()
        assert stderr.getvalue() == ""
        assert ("step 1/2" in stdout.getvalue()) == stdout.isatty()
