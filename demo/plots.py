"""Figures of a run from its metrics.jsonl files alone, no TensorBoard needed: what `make plots` draws.

    python -m demo.plots RUN_DIR [--out DIR]

RUN_DIR is a run of `make demo` (``moco/`` and ``fpn/r1..r3`` below it), or an ``--output-dir`` of either
trainer. Written to ``--out`` (default ``RUN_DIR/plots``):
- ``pretraining.png``: InfoNCE loss with the lr, InfoNCE top-1 accuracy, key spread (about 1 when the keys spread
  over the sphere, 0 when they collapse) and the kNN probe (epoch 0: the backbone before pretraining), by epoch;
- ``finetuning.png``: training loss, total and by component, with the lr on a second axis, and validation AP, AP50
  and AP75, by epoch across r1 -> r2 -> r3 (epochs count on from r1), where each stage starts marked.
A missing part (no pretraining, a stage not run yet) is left out with a log line; a run still training is drawn as
far as it got. No record at all is a one-line error (exit status 1).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from moco.runtime.logger import get_logger, setup_logging
from moco.runtime.metrics import FILE, read_metrics

from .recipe import STAGES

log = get_logger("demo.plots")

SIZE, DPI = (10, 7), 100  # 1000 x 700 pixels
PRETRAINING, FINETUNING = "pretraining.png", "finetuning.png"
VAL_METRICS = ("AP", "AP50", "AP75")


def load_run(run: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """Pretraining records, and fine-tuning records by stage in training order, from wherever the layouts put a
    metrics.jsonl: RUN/moco and RUN/fpn/<stage> (make demo), RUN itself and RUN/<stage> (a trainer's
    --output-dir). Fine-tuning records name their stage, which tells the two apart."""
    paths = [run / "moco" / FILE, run / FILE, *(run / sub / stage / FILE for sub in ("fpn", "") for stage in STAGES)]
    pretraining, stages = [], {}
    for path in filter(Path.is_file, paths):
        for record in read_metrics(path):
            if "stage" in record:
                stages.setdefault(record["stage"], []).append(record)
            else:
                pretraining.append(record)
    stages = {name: latest_per_epoch(records) for name, records in stages.items()}
    return latest_per_epoch(pretraining), dict(sorted(stages.items(), key=lambda item: item[1][0]["epoch"]))


def latest_per_epoch(records: list[dict]) -> list[dict]:
    """One record an epoch, the last written (a run started again over an old metrics.jsonl), in epoch order."""
    return sorted({record["epoch"]: record for record in records}.values(), key=lambda record: record["epoch"])


def stage_boundaries(stages: dict[str, list[dict]]) -> list[tuple[int, str]]:
    """(epoch, stage) for each stage after the first: the epoch it started from, its first record's minus one,
    which is where the stage before it ended."""
    return [(records[0]["epoch"] - 1, name) for name, records in list(stages.items())[1:]]


def _series(records: list[dict], *keys: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """Epochs and values of ``record[keys[0]][keys[1]]...`` over the records that hold it."""
    epochs, values = [], []
    for record in records:
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            epochs.append(record["epoch"])
            values.append(value * scale)
    return epochs, values


def _figure(rows: int, cols: int, title: str) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders the PNG; no pyplot, so no global state and no display needed
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[-cols:]:
        ax.set_xlabel("epoch")
    return fig, axes


def _with_lr(ax: Axes, records: list[dict]) -> None:
    """The lr on a second y axis, log scale (it falls by decades across stages), in the panel's legend. A record's
    lr is its epoch's (at the epoch's first step), drawn over the epoch: from the record's epoch minus one."""
    handles, labels = ax.get_legend_handles_labels()
    epochs, lrs = _series(records, "lr")
    if epochs:
        lr_axis = ax.twinx()
        lr_axis.plot([epochs[0] - 1, *epochs], [lrs[0], *lrs], drawstyle="steps-pre", color="tab:gray", alpha=0.8,
                     label="lr")
        lr_axis.set_yscale("log")
        lr_axis.set_ylabel("lr")
        more = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize="small")


def pretraining_figure(records: list[dict]) -> Figure:
    fig, (loss, accuracy, spread, knn) = _figure(2, 2, "MoCo pretraining")
    loss.plot(*_series(records, "loss"), "o-", label="InfoNCE loss")
    loss.set_ylabel("InfoNCE loss")
    _with_lr(loss, records)
    accuracy.plot(*_series(records, "acc1"), "o-")
    accuracy.set_ylabel("InfoNCE top-1 (%)")
    spread.plot(*_series(records, "key_spread"), "o-", label="key spread")
    spread.axhline(1.0, color="grey", linestyle=":", label="keys spread over the sphere")
    spread.set_ylim(bottom=0)
    spread.set_ylabel("key spread (0: collapse)")
    spread.legend(loc="lower right", fontsize="small")
    knn.plot(*_series(records, "knn_top1", scale=100), "o-", label="BatchNorm estimated on the crops")
    knn.plot(*_series(records, "knn_top1_own_bn", scale=100), "s--", label="BatchNorm as held")
    knn.set_ylabel("kNN probe top-1 (%)")
    knn.legend(loc="lower right", fontsize="small")
    return fig


def finetuning_figure(stages: dict[str, list[dict]]) -> Figure:
    fig, (losses, val) = _figure(2, 1, f"Faster R-CNN fine-tuning, {' -> '.join(stages)}")
    records = [record for stage in stages.values() for record in stage]
    losses.plot(*_series(records, "loss"), "o-", color="black", linewidth=2, label="loss")
    for key in sorted({key for record in records for key in record if key.startswith("loss_")}):
        losses.plot(*_series(records, key), ".-", linewidth=1, label=key.removeprefix("loss_"))
    losses.set_ylabel("training loss")
    _with_lr(losses, records)
    for name in VAL_METRICS:
        val.plot(*_series(records, "val", name), "o-", label=name)
    val.set_ylabel("validation")
    val.legend(loc="upper left", fontsize="small")
    for epoch, _ in stage_boundaries(stages):
        for ax in (losses, val):
            ax.axvline(epoch, color="black", linestyle="--", linewidth=1, alpha=0.6)
    above = blended_transform_factory(losses.transData, losses.transAxes)
    for name, stage in stages.items():  # the name over the middle of the stage's epochs
        losses.text((stage[0]["epoch"] - 1 + stage[-1]["epoch"]) / 2, 1.01, name, transform=above, ha="center",
                     va="bottom")
    return fig


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="runs/demo, or a --output-dir of moco.train or demo.train")
    p.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = get_parser().parse_args(argv)
    setup_logging()
    run = Path(args.run_dir)
    pretraining, stages = load_run(run)
    if not pretraining and not stages:
        raise SystemExit(f"{run}: no metrics.jsonl records here, in moco/ or in fpn/r1..r3 (not a run directory, "
                         f"or no epoch has finished yet)")
    if not pretraining:
        log.info("no pretraining records under %s: %s left out", run, PRETRAINING)
    if not stages:
        log.info("no fine-tuning records under %s: %s left out", run, FINETUNING)
    for name in (name for name in STAGES if stages and name not in stages):
        log.info("stage %s: no records under %s yet, left out of %s", name, run, FINETUNING)
    out = Path(args.out) if args.out else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {PRETRAINING: pretraining and pretraining_figure(pretraining),
               FINETUNING: stages and finetuning_figure(stages)}
    written = []
    for filename, fig in figures.items():
        if fig:
            fig.savefig(out / filename)
            log.info("wrote %s", out / filename)
            written.append(out / filename)
    return written


if __name__ == "__main__":
    main()
