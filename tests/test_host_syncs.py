"""Counting the host's waits for the GPU (demo.host_syncs), with the warnings torch's sync debug mode raises stood in
for by the same warning raised here: without a GPU nothing synchronises."""
import warnings

import pytest
import torch

from demo import host_syncs


def _synchronise():
    """A call that makes the host wait, as torch reports it under set_sync_debug_mode("warn")."""
    warnings.warn(host_syncs.MESSAGE, UserWarning, stacklevel=1)


def test_syncs_are_counted_by_step_and_origin_and_judged_after_the_warmup():
    counter = host_syncs.SyncCounter()
    per_step = {0: 2, 1: 1, 5: 1, 7: 1, 10: 2}
    # Other warnings are shown as before: here, to pytest's record. On the CPU no debug mode is set (it needs a
    # driver).
    with pytest.warns(UserWarning, match="not a synchronisation") as shown, counter.watching(torch.device("cpu")):
        _synchronise()  # before the first step
        for step, _ in enumerate(counter.steps(list(range(12)))):
            for _ in range(per_step.get(step, 0)):
                _synchronise()
            warnings.warn("not a synchronisation", UserWarning, stacklevel=1)
        _synchronise()  # after the last one
    assert len(shown) == 12 and all(str(w.message) == "not a synchronisation" for w in shown)
    assert [s.step for s in counter.syncs] == ["start", 0, 0, 1, 5, 7, 10, 10, "end"]
    figures = host_syncs.judge(counter.syncs, steps=12, warmup=2, check_every=5, scaler_allowed=False)
    assert (figures["total"], figures["warmup"], figures["steady"], figures["outside_steps"]) == (9, 3, 4, 2)
    assert figures["steady_at_check_steps"] == 3  # steps 5 and 10
    assert figures["offending_steps"] == [7, 10]  # 7 is no check step; 10 waited twice
    assert figures["steady_per_step"] == 0.4
    (origin,) = figures["origins"]
    assert origin["where"].startswith("tests/test_host_syncs.py:") and origin["where"].endswith(" in _synchronise")
    assert origin["call"] == origin["where"].split(" in ")[0] and origin["count"] == 9


def test_the_grad_scalers_reads_are_allowed_only_in_fp16():
    syncs = [host_syncs.Sync(step, "torch/amp/grad_scaler.py:1", "moco/runtime/precision.py:1 in optimizer_step", True)
             for step in (3, 4)]
    syncs += [host_syncs.Sync(4, "moco/runtime/failures.py:1", "moco/runtime/failures.py:1 in check", False)]
    assert host_syncs.judge(syncs, 6, 1, check_every=4, scaler_allowed=True)["offending_steps"] == []
    assert host_syncs.judge(syncs, 6, 1, check_every=4, scaler_allowed=False)["offending_steps"] == [3, 4]
