"""`make gpu-check` (demo.gpu_check): its exit statuses and table, and (slow) its CPU rehearsal end to end, so that
the script has run through every row before it first meets a GPU."""
import json
import subprocess
import sys

import pytest

from demo import gpu_check

ROOT = gpu_check.ROOT


def test_without_cuda_it_stops_in_one_sentence(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_problem", lambda: "Found no NVIDIA driver on your system")
    assert gpu_check.main(["--output-dir", str(tmp_path)]) == gpu_check.EXIT_NO_CUDA == 2
    err = capsys.readouterr().err
    assert err == ("gpu-check: error: no usable GPU here (Found no NVIDIA driver on your system); `make gpu-check "
                   "DEVICE=cpu` rehearses the check on the CPU\n")
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.parametrize("statuses, exit_status", [(["pass", "skipped: needs CUDA"], 0),
                                                    (["pass", "fail", "skipped: needs 2 GPUs"], 1)])
def test_exit_status_is_0_only_when_no_row_failed(monkeypatch, tmp_path, capsys, statuses, exit_status):
    rows = [gpu_check.Row(f"check {i}", status, {"logits": 1e-5}, {"logits": 1e-3}, detail=f"detail {i}")
            for i, status in enumerate(statuses)]
    monkeypatch.setattr(gpu_check.Check, "all", lambda self: rows)
    monkeypatch.setattr(gpu_check, "generate", lambda *a, **k: None)
    assert gpu_check.main(["--device", "cpu", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path)]) == (
        exit_status)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] == (exit_status == 0) and [r["status"] for r in report["rows"]] == statuses
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["check", "status", "measured", "tolerance"]
    for i, status in enumerate(statuses):
        line = next(line for line in table if line.startswith(f"check {i} "))
        assert line.split()[2] == status.split(":")[0] and "logits 1e-05" in line and line.endswith("logits 0.001")


def test_a_row_that_raises_fails_alone(tmp_path):
    check = gpu_check.Check(gpu_check.get_parser().parse_args(["--device", "cpu", "--output-dir", str(tmp_path)]))

    def broken():
        raise KeyError("stats")

    check.run("broken", broken)
    check.run("fine", lambda: gpu_check.Row("", "pass"))
    assert [(r.name, r.status, r.detail) for r in check.rows] == [("broken", "fail", "KeyError: 'stats'"),
                                                                  ("fine", "pass", "")]


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_row(tiny_data, tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "demo.gpu_check", "--device", "cpu", "--data", str(tiny_data),
                           "--output-dir", str(tmp_path)], cwd=ROOT, env=subprocess_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    status = {name: r["status"] for name, r in rows.items()}
    precision = "bf16" if gpu_check.autocast_dtype(gpu_check.torch.device("cpu")) else None
    assert status["doctor --exercise"] == "pass" and rows["doctor --exercise"]["measured"]["kernels_exercised"] == 4
    # CPU against CPU through the same code: fp32 to the bit; bf16 (where native) within its tolerance.
    assert status["MoCo step, fp32, CPU vs CPU"] == "pass"
    assert set(rows["MoCo step, fp32, CPU vs CPU"]["measured"].values()) == {0.0}
    if precision:
        assert status["MoCo step, bf16, CPU vs CPU"] == "pass"
        assert 0 < rows["MoCo step, bf16, CPU vs CPU"]["measured"]["logits"]
    syncs = [name for name in rows if name.startswith("host syncs")]
    assert syncs and all(status[name].startswith("skipped: needs CUDA") for name in syncs)
    ran = rows[syncs[-1]]["measured"]  # the training precision's steps ran, counting
    assert ran["steps"] == gpu_check.CPU_SIZES.sync_steps and ran["total"] == 0 and ran["loss"] > 0
    assert status["r1 fine-tuning, a few steps"] == "pass"
    assert rows["r1 fine-tuning, a few steps"]["measured"]["backbone"].endswith("backbone.pth.tar")
    assert (tmp_path / "fpn" / "r1" / "checkpoint_last.pth.tar").is_file()
    evaluation = rows["demo.evaluate, validation split"]
    assert evaluation["status"] == "pass"
    assert evaluation["measured"]["images"] == gpu_check.CPU_SIZES.finetune_images[1]  # r1's own validation split
    assert status[f"demo.bench --only {' '.join(gpu_check.CPU_SIZES.bench_kinds)}"] == "pass"
    ranks = rows["2 ranks (gloo) vs 1 process"]
    assert ranks["status"] == "pass" and ranks["measured"]["logits"] <= ranks["tolerance"]["logits"]
