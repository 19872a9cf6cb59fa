"""The GPU check's step comparison (demo.step_check) on the CPU: the same set-up gives the same figures to the bit,
and the figures tell a wrong key shuffle or a lower precision from rounding."""
import math

import pytest
import torch

from demo import step_check

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def case(tiny_data):
    args = step_check.step_args(tiny_data / "train", 8, 2)  # split BN in 2 groups of 4
    views = step_check.first_batch(args)
    state = step_check.initial_state(args)
    return args, views, state, step_check.cpu_reference(args, state, views)


def test_the_same_step_twice_is_identical(case):
    args, views, state, reference = case
    again = step_check.compare_devices(args, state, views, CPU, None, reference)
    assert again["measured"] == dict.fromkeys(step_check.TOLERANCES["fp32"], 0.0) and again["beyond"] == []
    assert reference.loss > 0 and all(u.abs().max() > 0 for u in reference.update.values())


def test_another_key_shuffle_is_beyond_the_fp32_tolerance(case, monkeypatch):
    args, views, state, reference = case
    monkeypatch.setattr(step_check, "SHUFFLE_SEED", 1)  # the keys normalised with other images
    measured = step_check.differences(step_check.run_step(args, state, views, CPU, None), reference)
    assert {"logits", "queue"} <= set(step_check.within(measured, step_check.TOLERANCES["fp32"]))
    assert measured["running"] == 0  # the query encoder's statistics do not depend on the keys' shuffle


def test_bf16_is_within_the_mixed_tolerance_and_visibly_not_fp32(case):
    args, views, state, reference = case
    result = step_check.compare_devices(args, state, views, CPU, torch.bfloat16, reference)
    assert result["beyond"] == []
    assert step_check.within(result["measured"], step_check.TOLERANCES["fp32"])


def test_an_fp16_step_is_retried_at_half_the_scale_until_the_scaler_takes_it(monkeypatch):
    scales = []

    def run_step(args, state, views, device, amp_dtype, world_size=1, init_scale=2.0**16):
        scales.append(init_scale)
        return step_check.StepResult(1.0, torch.zeros(1), torch.zeros(1), {}, updated=init_scale <= 2.0**13)

    monkeypatch.setattr(step_check, "run_step", run_step)
    result, scale = step_check.fp16_step(None, {}, None, CPU)
    assert scales == [2.0**16, 2.0**15, 2.0**14, 2.0**13] and scale == 2.0**13 and result.updated


def test_a_nan_figure_is_beyond_any_tolerance_and_never_passed_over():
    assert step_check.within({"logits": float("nan"), "loss": 0.0}, {"logits": 1.0, "loss": 1.0}) == ["logits"]
    assert math.isnan(step_check._worst([0.5, float("nan"), 0.1])) and step_check._worst([0.5, 0.1]) == 0.5
