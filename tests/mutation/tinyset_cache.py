"""pytest plugin of `make mutate`: the tiny dataset is rendered once for the whole mutation run.

mutmut runs each mutant's tests in a fresh process, where conftest's session fixture would render the dataset
again, which takes longer than the tests themselves. The rendering is deterministic, so a copy of a dataset
rendered once with the same parameters is the same dataset.
"""
import shutil
from pathlib import Path

import moco.course.tinyset

CACHE = Path(__file__).resolve().parents[2] / ".tinyset-cache"
_render = moco.course.tinyset.generate


def _generate_from_cache(out, **params):
    cached = CACHE / "-".join(f"{k}{v}" for k, v in sorted(params.items()) if k != "workers")
    _render(cached, **params)  # a no-op once the cached copy is complete
    shutil.copytree(cached, out, dirs_exist_ok=True)
    return Path(out)


def pytest_configure(config):
    moco.course.tinyset.generate = _generate_from_cache
