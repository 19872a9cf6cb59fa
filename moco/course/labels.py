"""What is wrong with a labeled split, and what training does about it: one vocabulary for the loaders and for
``demo.check``.

Every problem is found in one pass and reported together, grouped by kind, so that 50 bad files among 30,000 take
one attempt to find, not 50. Each kind is either an error, which training refuses (a length mismatch or an unknown
class name cannot be repaired without guessing), or a repair, which training makes and summarises at start (a box
reaching outside its image is clamped to it; a box with no area left is dropped). ``--strict-labels`` turns the
repairs into errors. Images without boxes are valid background images, not a problem. ``demo.check`` adds notes on
images that decode by the policy of ``moco.course.images`` (16-bit, palette, transparency...): neither errors nor
repairs.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# The smallest box side kept, in pixels: what torchvision's SanitizeBoundingBoxes keeps in the training transform,
# so that evaluation's ground truth holds exactly the boxes training can see.
MIN_BOX_SIZE = 1.0

# kind -> whether training refuses it (an error) rather than repairing it
KINDS: dict[str, bool] = {
    "annotation file that does not parse": True,
    "split without images": True,
    "unreadable image": True,
    "empty image file": True,
    "image without label file": True,
    "listed image missing": True,
    "image not named N.JPEG": True,
    "duplicate image id": True,
    "empty label file": True,
    "YAML that does not parse": True,
    "label file without bboxes/labels": True,
    "length mismatch": True,
    "malformed box": True,
    "unknown class": True,
    "box outside the image (clamped)": False,
    "box without area (dropped)": False,
    "label file without image (ignored)": False,
}
# Images that moco.course.images converts by its stated policy, reported by demo.check: notes, which training accepts
# even under --strict-labels (it refuses label repairs, not image modes).
IMAGE_NOTES: tuple[str, ...] = (
    "16/32-bit greyscale (scaled to 8 bits)",
    "palette image (converted to RGB)",
    "transparency (composited on white)",
    "greyscale image (converted to RGB)",
    "other image mode (converted to RGB)",
    "EXIF orientation (applied)",
)
KINDS.update(dict.fromkeys(IMAGE_NOTES, False))


@dataclass(frozen=True)
class Problem:
    path: Path
    kind: str  # one of KINDS
    detail: str = ""

    def __post_init__(self):
        assert self.kind in KINDS, self.kind

    @property
    def is_error(self) -> bool:
        return KINDS[self.kind]

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.detail else str(self.path)


def is_box(value) -> bool:
    """Four finite numbers (booleans are not numbers here)."""
    return (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def fit_boxes(path: Path, boxes: list[list[float]], width: int, height: int) -> tuple[list[int], list[list[float]],
                                                                                        list[Problem]]:
    """Clamp ``boxes`` (XYXY pixels) to the image and drop those left with a side under ``MIN_BOX_SIZE``.
    Returns the indices kept, their clamped boxes, and a repair ``Problem`` for every box changed or dropped."""
    kept, fitted, problems = [], [], []
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        clamped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                   min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        if clamped[2] - clamped[0] < MIN_BOX_SIZE or clamped[3] - clamped[1] < MIN_BOX_SIZE:
            where = "" if clamped == [x0, y0, x1, y1] else f" inside the {width}x{height} image"
            problems.append(Problem(path, "box without area (dropped)", f"box {i} {shown} has no area{where}"))
            continue
        if clamped != [x0, y0, x1, y1]:
            problems.append(Problem(path, "box outside the image (clamped)",
                                    f"box {i} {shown} reaches outside the {width}x{height} image"))
        kept.append(i)
        fitted.append(clamped)
    return kept, fitted, problems


def errors(problems: list[Problem], strict: bool = False) -> list[Problem]:
    """What training refuses: the errors, and with ``strict`` the repairs too (never the ignored extras, never the
    image notes)."""
    return [p for p in problems if p.is_error or (strict and "(ignored)" not in p.kind and p.kind not in IMAGE_NOTES)]


def plural(n: int, word: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {word}{'s' * (n != 1)}"


def summary(problems: list[Problem], limit: int | None = None) -> str:
    """Problems grouped by kind, errors first, with counts of problems and files; at most ``limit`` lines of
    detail a kind (None: every one)."""
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for kind in sorted(by_kind, key=lambda k: (not KINDS[k], list(KINDS).index(k))):
        found = by_kind[kind]
        files = len({p.path for p in found})
        count = plural(files, "file") if files == len(found) else f"{len(found)} in {plural(files, 'file')}"
        lines.append(f"  {kind}: {count}")
        shown = found if limit is None else found[:limit]
        lines += [f"    {p}" for p in shown]
        if len(shown) < len(found):
            lines.append(f"    ... and {len(found) - len(shown)} more")
    return "\n".join(lines)
