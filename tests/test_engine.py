import pytest
import torch

from demo.engine import stage_schedule
from demo.recipe import WARMUP_FACTOR, warmup_factor


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0, momentum=0.9)


def _run(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_a_fresh_stage_warms_up_linearly_to_its_lr_then_holds_it():
    optimizer = _optimizer()
    lrs = _run(stage_schedule(optimizer, 0.02, warmup_iters=4), optimizer, 6)
    assert lrs[0] == pytest.approx(0.02 * WARMUP_FACTOR)
    assert lrs[:4] == pytest.approx([0.02 * warmup_factor(i, 4) for i in range(4)])
    assert lrs[4:] == [0.02, 0.02]


def test_a_resumed_stage_goes_on_where_the_warm_up_stood():
    """Stopped after 3 of 8 warm-up steps and resumed from the saved state, even when the caller passes another
    lr (the recipe's, recomputed): the same lrs as an uninterrupted stage."""
    optimizer = _optimizer()
    uninterrupted = _run(stage_schedule(optimizer, 0.01, warmup_iters=8), optimizer, 10)

    optimizer = _optimizer()
    first = stage_schedule(optimizer, 0.01, warmup_iters=8)
    before = _run(first, optimizer, 3)
    saved = first.state_dict()
    optimizer = _optimizer()
    after = _run(stage_schedule(optimizer, 0.5, warmup_iters=8, saved=saved), optimizer, 7)
    assert before + after == pytest.approx(uninterrupted)


def test_an_explicit_lr_replaces_the_saved_one_at_the_same_point_of_the_warm_up():
    optimizer = _optimizer()
    first = stage_schedule(optimizer, 0.01, warmup_iters=8)
    _run(first, optimizer, 3)
    optimizer = _optimizer()
    resumed = stage_schedule(optimizer, 0.01, warmup_iters=8, saved=first.state_dict(), lr_asked=0.04)
    assert resumed.base_lrs == [0.04]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04 * warmup_factor(3, 8))
    assert _run(resumed, optimizer, 6)[-1] == pytest.approx(0.04)
