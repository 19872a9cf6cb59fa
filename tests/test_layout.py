"""The package cut holds: moco.runtime and moco.course never import the method or the detector, the method never
imports the detector, and the commands that moved still answer at their old names."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD = {p.stem for p in (ROOT / "moco").glob("*.py")} - {"__init__", "doctor", "tinyset"}


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute dotted names that ``path`` (a file under ``root``) imports, relative imports resolved."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names |= {f"{base}.{a.name}" for a in node.names} | {base}
    return names


def method_or_detector(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "demo" or (parts[0] == "moco" and len(parts) > 1 and parts[1] in METHOD)


@pytest.mark.parametrize("package", ["runtime", "course"])
def test_the_shared_packages_import_neither_the_method_nor_the_detector(package):
    files = sorted((ROOT / "moco" / package).glob("*.py"))
    assert len(files) > 3
    wrong = {f.name: sorted(filter(method_or_detector, imported(f))) for f in files}
    assert {name: found for name, found in wrong.items() if found} == {}


def test_the_method_does_not_import_the_detector():
    wrong = {f.name: sorted(n for n in imported(f) if n.split(".")[0] == "demo") for f in (ROOT / "moco").glob("*.py")}
    assert {name: found for name, found in wrong.items() if found} == {}


def test_the_checker_sees_an_arrow_that_runs_back_up(tmp_path):
    """imported() resolves the relative form the packages use, so the rules above can fail."""
    path = tmp_path / "moco" / "runtime" / "checkpoint.py"
    path.parent.mkdir(parents=True)
    path.write_text("from ..builder import MoCo\nfrom . import logger\nimport demo.model\n")
    found = sorted(filter(method_or_detector, imported(path, tmp_path)))
    assert found == ["demo.model", "moco.builder", "moco.builder.MoCo"]


@pytest.mark.parametrize("old, new", [("moco.doctor", "moco.runtime.doctor"), ("moco.tinyset", "moco.course.tinyset")])
def test_a_moved_command_answers_at_its_old_name_and_says_where_it_went(old, new):
    moved = subprocess.run([sys.executable, "-m", old, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert f"python -m {old} is now python -m {new}" in moved.stderr
    assert moved.stdout.startswith("usage:")
