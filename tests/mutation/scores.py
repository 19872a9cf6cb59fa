"""Per-module mutation scores of a finished `mutmut run` (run from its directory), and every mutant that lived.

    python scores.py 'moco.builder.*' 'demo.sampler.*' ...   # the name patterns that were run
"""
import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main(patterns: list[str]) -> None:
    statuses: dict[str, Counter] = defaultdict(Counter)
    alive: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        for name, exit_code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            status = status_by_exit_code[exit_code]
            module = str(meta.relative_to("mutants")).removesuffix(".meta")
            statuses[module][status] += 1
            if status not in ("killed", "timeout"):
                alive.append(f"{status:10} {name}")
    print(f"{'module':22} {'killed':>7} {'total':>6} {'score':>6}   other outcomes")
    for module, counts in sorted(statuses.items()):
        killed, total = counts["killed"] + counts["timeout"], sum(counts.values())
        others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "timeout"))
        print(f"{module:22} {killed:7d} {total:6d} {100 * killed / total:5.1f}%   {others}")
    print("\nNot killed (`mutmut show NAME` in this directory shows the change):")
    print("\n".join(alive) or "none")


if __name__ == "__main__":
    main(sys.argv[1:])
