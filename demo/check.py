"""Check a dataset before the GPU hours: every problem of every file in one pass, grouped by kind, with counts.

    python -m demo.check DATA... [--splits S ...] [--workers N] [--limit N] [--json FILE] [--strict-labels]

Each DATA is an unlabeled folder (whatever ``moco.data.find_unlabeled_images`` accepts: ``train/``,
``train/unlabeled/`` or a flat folder of images) and/or a labeled root, told apart by layout: the course's
``<root>/<split>/images`` + ``labels``, or COCO's ``<root>/annotations/instances_<split>.json`` with the images in
``<root>/<split>/``. A labeled root's splits are all those it has; ``--splits`` names the ones to check, and a named
split that a labeled root lacks is a usage error. A path that is neither is a usage error too.

Every image is decoded in full by ``moco.course.images.read_image``, as training reads it, in ``--workers`` processes
(default: the CPUs this process may run on, which under Slurm is the job's allocation), while the main process reads
the label files with the loaders' own code (``demo.datasets.read_split``). Only each file's problems, never its
pixels, travel back from the workers.

The report, on stdout: the problems grouped by kind with counts (errors, then the repairs training makes, then notes
on image modes that ``moco.course.images`` converts by its policy; see ``moco.course.labels``), the boxes per class
and split (classes without a box in a training split flagged), and a line of totals with the rate. Progress goes to
stderr.
Exit status: 0 without errors (repairs and notes allowed), 1 with errors (with ``--strict-labels`` the repairs
count, as in training), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from demo.datasets import DetectionSet, read_split
from moco.course.images import UnreadableImage, is_image, number_key, read_image
from moco.course.labels import Problem, errors, plural, summary
from moco.data import find_unlabeled_images

# How moco.course.images.read_image's notes begin -> their kind; any other note is "other image mode".
_NOTE_KINDS = (
    ("16-bit", "16/32-bit greyscale (scaled to 8 bits)"), ("32-bit", "16/32-bit greyscale (scaled to 8 bits)"),
    ("palette", "palette image (converted to RGB)"), ("transparency", "transparency (composited on white)"),
    ("greyscale", "greyscale image (converted to RGB)"), ("EXIF orientation", "EXIF orientation (applied)"),
)
_TTY_EVERY, _LOG_EVERY = 0.5, 10.0  # seconds between progress lines: in place on a terminal, appended to a log
_CHUNKS_PER_WORKER = 8  # enough chunks for even shares and steady progress, few enough to keep overhead small
_MAX_CHUNK = 256


def _note_kind(note: str) -> str:
    return next((kind for start, kind in _NOTE_KINDS if note.startswith(start)), "other image mode (converted to RGB)")


def _decode(paths: list[str]) -> list[list[tuple[str, str]]]:
    """In a worker: each image decoded in full, as training reads it; its problems as (kind, detail)."""
    found = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                found.append([("empty image file", "0 bytes")])
                continue
            found.append([(_note_kind(note), note) for note in read_image(path)[1]])
        except (OSError, UnreadableImage) as exc:
            found.append([("unreadable image", str(exc).removeprefix(f"{path}: "))])
    return found


@dataclass
class Plan:
    """What the inputs hold: the images to decode, in order, and the labeled splits as (column, root, split)."""
    unlabeled: dict[Path, None] = field(default_factory=dict)
    labeled: dict[Path, None] = field(default_factory=dict)
    splits: list[tuple[str, Path, str]] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)  # what each input was taken for, for the report

    @property
    def images(self) -> list[Path]:
        return list({**self.unlabeled, **self.labeled})


def _find_splits(root: Path) -> list[str]:
    """A labeled root's splits: course folders with images/ or labels/, COCO annotation files."""
    course = {d.name for d in root.iterdir() if d.is_dir() and ((d / "images").is_dir() or (d / "labels").is_dir())}
    coco = {f.name.removeprefix("instances_").removesuffix(".json")
            for f in (root / "annotations").glob("instances_*.json")}
    return sorted(course | coco)


def _split_images(root: Path, split: str) -> list[Path]:
    """Every image file of a split, listed or not, with the layout ``read_split`` picks for it."""
    if (root / split / "labels").is_dir():
        folder = root / split / "images"
        if not folder.is_dir():
            raise ValueError(f"{root / split}: has labels/ but no images/")
        return sorted((p for p in folder.iterdir() if is_image(p.name)), key=lambda p: (number_key(p), p.name))
    if (root / "annotations" / f"instances_{split}.json").is_file():
        folder = root / split
        return sorted(p for p in folder.rglob("*") if is_image(p.name)) if folder.is_dir() else []
    raise ValueError(f"{root / split}: has images/ but no labels/ (--splits names the splits to check)")


def plan(paths: list[Path], splits: list[str] | None) -> Plan:
    """Each path as unlabeled images and/or a labeled root; a path that is neither raises ValueError."""
    found = Plan()
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path}: no such directory")
        try:
            unlabeled = find_unlabeled_images(path)
        except FileNotFoundError:
            unlabeled = []
        if unlabeled:
            found.unlabeled.update(dict.fromkeys(unlabeled))
            found.taken.append(f"{path}: {len(unlabeled)} unlabeled images in {unlabeled[0].parent}")
        present = _find_splits(path)
        if present:
            missing = sorted(set(splits or []) - set(present))
            if missing:
                raise ValueError(f"{path}: no split {', '.join(missing)} (it has {', '.join(present)})")
            chosen = [s for s in present if splits is None or s in splits]
            for split in chosen:
                found.labeled.update(dict.fromkeys(_split_images(path, split)))
                found.splits.append((split, path, split))
            found.taken.append(f"{path}: labeled, split{'s' * (len(chosen) != 1)} {', '.join(chosen)}")
        if not unlabeled and not present:
            raise ValueError(f"{path}: neither unlabeled images (N.PNG in it, in unlabeled/ or in train/unlabeled/) "
                             "nor a labeled root (<root>/<split>/images + labels, or "
                             "<root>/annotations/instances_<split>.json)")
    names = Counter(split for split, _, _ in found.splits)  # a column a split; the root tells equal names apart
    found.splits = [(split if names[split] == 1 else str(root / split), root, split) for _, root, split in found.splits]
    return found


def _read_labels(splits: list[tuple[str, Path, str]]) -> tuple[list[tuple[str, DetectionSet]], list[Problem]]:
    """Each split as the loaders build it, and its problems: what training would refuse, repair or ignore."""
    sets, problems = [], []
    for column, root, split in splits:
        try:
            dataset = read_split(root, split)
        except ValueError as exc:
            problems.append(Problem(root / "annotations" / f"instances_{split}.json",
                                    "annotation file that does not parse", str(exc).split(": ", 1)[-1]))
            continue
        problems += dataset.problems
        if not dataset.samples and not errors(dataset.problems):
            problems.append(Problem(Path(dataset.source), "split without images", "training refuses it"))
        sets.append((column, dataset))
    return sets, problems


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class Progress:
    """Images decoded so far, as a line on stderr: rewritten in place on a terminal, appended now and then to a log.
    ``add`` runs in the pool's result thread; a thread of its own writes."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, count: int) -> None:
        self.done += count

    def line(self) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        left = f", about {_duration((self.total - self.done) / rate)} left" if 0 < self.done < self.total else ""
        return f"decoded {self.done}/{self.total} images, {rate:.0f} images/s{left}"

    def _show(self) -> None:
        self.stream.write(f"\r{self.line()}\033[K" if self.tty else f"{self.line()}\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(_TTY_EVERY if self.tty else _LOG_EVERY):
            self._show()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self._show()
            self.stream.write("\n")


def run(found: Plan, workers: int) -> tuple[list[Problem], list[tuple[str, DetectionSet]]]:
    """Decode every image in ``workers`` processes while this one reads the labels; every problem, and the splits."""
    images = found.images
    size = max(1, min(_MAX_CHUNK, math.ceil(len(images) / (workers * _CHUNKS_PER_WORKER))))
    chunks = [[str(p) for p in images[i:i + size]] for i in range(0, len(images), size)]
    progress = Progress(len(images))
    with multiprocessing.Pool(workers) as pool:  # forked before the progress thread starts
        pending = [pool.apply_async(_decode, (chunk,), callback=lambda r: progress.add(len(r))) for chunk in chunks]
        with progress:
            sets, label_problems = _read_labels(found.splits)
            decoded = [problems for result in pending for problems in result.get()]
    image_problems = [Problem(path, kind, detail) for path, found_here in zip(images, decoded)
                      for kind, detail in found_here]
    # The full decode's verdict replaces the loader's, which read the header alone.
    unreadable = {p.path for p in image_problems if p.is_error}
    return image_problems + [p for p in label_problems if not (p.kind == "unreadable image" and p.path in unreadable)
                             ], sets


def class_counts(sets: list[tuple[str, DetectionSet]]) -> tuple[list[str], dict[str, Counter]]:
    """Every class name of the splits, in category order, and the boxes of each class a split (after the repairs)."""
    names: dict[str, None] = {}
    counts = {}
    for column, dataset in sets:
        names.update(dict.fromkeys(dataset.categories.values()))
        counts[column] = Counter(dataset.categories[c] for s in dataset.samples for c in s.category_ids)
    return list(names), counts


def _is_training(column: str) -> bool:
    return Path(column).name.startswith("train")


def class_table(names: list[str], counts: dict[str, Counter]) -> list[str]:
    """Boxes per class and split, classes without a box in a training split flagged; unused classes on one line."""
    columns = list(counts)
    used = [n for n in names if any(counts[c][n] for c in columns)]
    unused = [n for n in names if n not in used]
    width = max(map(len, ["class", "total", *used]))
    widths = [max(len(c), 6) for c in columns]

    def row(name: str, values: list[int], flag: str = "") -> str:
        return "  " + name.ljust(width) + "".join(f"  {v:>{w}}" for v, w in zip(values, widths)) + flag

    lines = ["boxes per class:", "  " + "class".ljust(width) + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))]
    for name in used:
        bare = any(counts[c][name] == 0 for c in columns if _is_training(c))
        lines.append(row(name, [counts[c][name] for c in columns], "  <- no box in training" if bare else ""))
    lines.append(row("total", [sum(counts[c].values()) for c in columns]))
    if unused:
        lines += textwrap.wrap(f"no box in any split: {len(unused)} of the {len(names)} classes: {', '.join(unused)}",
                               width=118, initial_indent="  ", subsequent_indent="    ")
    return lines


def report(found: Plan, problems: list[Problem], sets: list[tuple[str, DetectionSet]], strict: bool, workers: int,
           elapsed: float, limit: int | None) -> tuple[str, dict]:
    """The report as text, and the same as a JSON-ready dict."""
    refused = errors(problems, strict)
    names, counts = class_counts(sets)
    images = len(found.images)
    rate = images / max(elapsed, 1e-9)
    error_files = len({p.path for p in refused})
    verdict = f"{plural(len(refused), 'error')} in {plural(error_files, 'file')}" if refused else "no errors"
    refused_set = set(refused)
    warnings = [p for p in problems if p not in refused_set]
    total = (f"checked {images} images ({len(found.unlabeled)} unlabeled, {len(found.labeled)} labeled in "
             f"{plural(len(sets), 'split')}) in {elapsed:.1f} s, {rate:.0f} images/s with {plural(workers, 'worker')}: "
             f"{verdict}, {plural(len(warnings), 'warning')}")
    lines = ["inputs:", *(f"  {t}" for t in found.taken)]
    if not problems:
        lines.append("problems: none")
    if refused:
        lines += ["errors (training refuses these):", summary(refused, limit)]
    if warnings:
        lines += ["warnings (training repairs, ignores or converts these):", summary(warnings, limit)]
    if sets:
        lines += class_table(names, counts)
    lines.append(total)
    data = {
        "inputs": found.taken,
        "images": {"unlabeled": len(found.unlabeled), "labeled": len(found.labeled)},
        "problems": [{"path": str(p.path), "kind": p.kind, "detail": p.detail, "error": p in refused_set}
                     for p in problems],
        "kinds": dict(Counter(p.kind for p in problems)),
        "classes": {column: {n: counts[column][n] for n in names} for column in counts},
        "errors": len(refused), "error_files": error_files, "elapsed_s": round(elapsed, 3),
        "images_per_s": round(rate, 1), "workers": workers, "exit_status": int(bool(refused)),
    }
    return "\n".join(lines), data


def _cpus() -> int:
    """The CPUs this process may run on: a Slurm job's allocation, not the whole node's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.check", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 no errors (repairs and notes allowed), 1 errors, 2 usage.")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA",
                   help="unlabeled folders and/or labeled roots (course or COCO layout), told apart by layout")
    p.add_argument("--splits", nargs="+", metavar="SPLIT",
                   help="the labeled splits to check (default: every split each labeled root has)")
    p.add_argument("--workers", type=int, default=_cpus(),
                   help="decoding processes (default: the CPUs this process may use, %(default)s here)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N lines of detail a kind (default: every file)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--strict-labels", action="store_true",
                   help="count the label repairs (clamped or dropped boxes) as errors, as demo.train's flag does")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: at least 1")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit {args.limit}: 0 or more")
    try:
        args.plan = plan(args.data, args.splits)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    problems, sets = run(args.plan, args.workers)
    text, data = report(args.plan, problems, sets, args.strict_labels, args.workers, time.monotonic() - start,
                        args.limit)
    print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return data["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
