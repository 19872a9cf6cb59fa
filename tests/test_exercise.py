"""The preflight's real work (moco.runtime.exercise, `moco.runtime.doctor --exercise`), run on the CPU: passes, and each
way it fails, in one sentence naming the host and the device."""
import re
import socket

import pytest
import torch

from moco.runtime import doctor, exercise

CPU = torch.device("cpu")


def test_every_dtype_and_op_runs_in_low_precision_within_tolerance():
    lines = exercise.exercise([CPU], seconds=0.05)
    assert len(lines) == 4  # bf16 and fp16, matmul and convolution
    for line, (dtype, op) in zip(lines, [(d, o) for d in ("bf16", "fp16") for o in ("matmul", "convolution")]):
        assert f": {dtype} {op} (" in line
        deviation = float(re.search(r"largest deviation from fp32 ([\d.e+-]+)", line).group(1))
        # Rounded to bf16/fp16, the result cannot equal fp32's; a broken kernel would be off by its whole size.
        assert 0 < deviation < exercise.TOLERANCE[torch.bfloat16 if dtype == "bf16" else torch.float16]


def _broken(op, corrupt):
    def run(a, b):
        out = op(a, b)
        return corrupt(out) if a.dtype == torch.bfloat16 else out  # the fp32 reference stays right
    return run


def _doctor_error(capsys) -> str:
    assert doctor.main(["--device", "cpu", "--exercise"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("doctor: error: ")
    return err.strip()[len("doctor: error: "):]


def test_a_non_finite_result_fails_the_preflight_in_one_sentence(monkeypatch, capsys):
    def nan_in_one_place(out):
        out = out.clone()
        out.view(-1)[7] = float("nan")
        return out

    monkeypatch.setitem(exercise.OPS, "matmul", _broken(exercise._matmul, nan_in_one_place))
    sentence = _doctor_error(capsys)
    assert sentence.startswith("the CPU") and f"on host {socket.gethostname()}: " in sentence
    assert re.search(r": bf16 matmul gave (\d+) non-finite values over \1 runs of a 256x256 result$", sentence)


def test_a_wrong_but_finite_result_fails_naming_its_deviation(monkeypatch, capsys):
    monkeypatch.setitem(exercise.OPS, "convolution", _broken(exercise._convolution, lambda out: out * 1.5))
    sentence = _doctor_error(capsys)
    match = re.search(r": bf16 convolution differs from fp32 by ([\d.]+) of the result's RMS \(tolerance 0.1\)$",
                      sentence)
    assert match and float(match.group(1)) > 0.5  # half of every value is off


def test_a_kernel_that_raises_fails_with_its_first_line(monkeypatch):
    def fault(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
        return exercise._matmul(a, b)

    monkeypatch.setitem(exercise.OPS, "matmul", fault)
    with pytest.raises(exercise.ExerciseFailed) as failed:
        exercise.exercise([CPU], seconds=0.01)
    assert str(failed.value).endswith(": fp16 matmul failed: CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("capability, expected", [((7, 0), [torch.float16]),
                                                  ((9, 0), [torch.float16, torch.bfloat16])])
def test_gpus_exercise_bf16_only_where_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    gpu = torch.device("cuda", 3)
    assert exercise.dtypes(gpu) == expected
    assert exercise.describe(gpu) == "GPU 3 (Tesla V100-SXM2-32GB)"


def test_exercise_needs_the_gpus_that_build_only_skips():
    with pytest.raises(SystemExit):
        doctor.main(["--build-only", "--exercise"])
