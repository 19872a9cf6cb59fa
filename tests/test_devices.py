"""The torch build fits the site's GPUs, and a job given GPUs it cannot use stops at once with one sentence.

What a CPU can check: the installed wheel's compiled architectures, the coverage rule, the refusal paths (this
machine has no driver, so CUDA is unusable exactly as on a node without one or in a container without --nv), and
a GPU the build has no kernels for (torch's device queries faked).
"""
from pathlib import Path

import pytest
import torch

from demo import evaluate as demo_evaluate
from demo import train as demo_train
from moco import train as moco_train
from moco.runtime import devices, doctor
from moco.runtime.precision import autocast_dtype, true_fp32
from slurm import launch  # the site config's one reader (bash sources it, as the Makefile and the jobs do)

ROOT = Path(__file__).resolve().parents[1]

GPU_ENV = (*devices.GPU_VARIABLES, devices.DEVICE_ENV)


@pytest.fixture
def no_gpu_env(monkeypatch):
    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_installed_build_carries_the_sites_architectures():
    required = launch.read_config().get("CUDA_ARCHS", "").split()
    assert required, "the site config names no CUDA_ARCHS"
    compiled = devices.compiled_archs()
    assert doctor.missing_archs(required, compiled) == [], (
        f"torch {torch.__version__} carries {compiled}; the site config needs {required} (TORCH_BUILD in the "
        f"Makefile)")


def test_example_config_asks_for_volta_ampere_and_hopper():
    text = (ROOT / "slurm" / "site.conf.example").read_text()
    assert "CUDA_ARCHS=${CUDA_ARCHS:-sm_70 sm_80 sm_90}" in text and "TORCH_BUILD=${TORCH_BUILD:-cu128}" in text


CU128 = "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()
CU132 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()


@pytest.mark.parametrize("capability, archs, covered", [
    ((7, 0), CU128, True),  # V100
    ((7, 0), CU132, False),  # V100 on a CUDA 13 build: no kernel
    ((8, 0), CU132, True),  # A100
    ((8, 9), CU128, True),  # L40: sm_86 machine code runs on a later minor version
    ((9, 0), CU128, True),  # H100
    ((7, 5), ["sm_80"], False),  # never on an older GPU
    ((9, 0), ["sm_86"], False),  # nor across a major version
    ((10, 0), ["sm_90", "compute_90"], True),  # PTX compiles for newer GPUs
    ((8, 6), ["compute_90"], False),
    ((9, 0), ["sm_90a"], True),
    ((9, 1), ["sm_90a"], False),  # arch-specific code runs on exactly that GPU
    ((12, 0), ["sm_120"], True),
])
def test_coverage_rule(capability, archs, covered):
    assert devices.arch_covered(capability, archs) is covered


def test_missing_archs_names_each_and_rejects_typos():
    assert doctor.missing_archs(["sm_70", "sm_80", "sm_90"], CU132) == ["sm_70"]
    with pytest.raises(ValueError, match="'v100'"):
        doctor.missing_archs(["v100"], CU128)


@pytest.mark.parametrize("env, given", [
    ({}, ""),
    ({"CUDA_VISIBLE_DEVICES": ""}, ""),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, ""),
    ({"SLURM_GPUS_ON_NODE": "0"}, ""),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # an index: the first GPU
    ({"SLURM_STEP_GPUS": "0"}, "SLURM_STEP_GPUS=0"),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_GPUS_ON_NODE=4 SLURM_JOB_GPUS=0,1,2,3"),
])
def test_allocated_gpus_reads_slurm_and_cuda_variables(env, given):
    assert devices.allocated_gpus(env) == given


def test_cpu_only_when_nothing_was_allocated(no_gpu_env):
    assert not torch.cuda.is_available()  # these tests are the no-driver case
    assert devices.select_device("auto") == torch.device("cpu")


def test_allocated_gpus_without_cuda_refuse_in_one_sentence(no_gpu_env):
    no_gpu_env.setenv("SLURM_GPUS_ON_NODE", "2")
    with pytest.raises(devices.DeviceError) as refused:
        devices.select_device("auto")
    message = str(refused.value)
    assert message.startswith("this job was given GPUs (SLURM_GPUS_ON_NODE=2) but CUDA cannot use them: ")
    assert torch.__version__ in message and "--device cpu" in message and "\n" not in message
    assert devices.select_device("cpu") == torch.device("cpu")  # on purpose
    no_gpu_env.setenv(devices.DEVICE_ENV, "cpu")
    assert devices.select_device() == torch.device("cpu")


def test_cuda_asked_for_without_cuda_refuses(no_gpu_env):
    with pytest.raises(devices.DeviceError, match="--device cuda was asked for but CUDA cannot use them"):
        devices.select_device("cuda")
    with pytest.raises(devices.DeviceError, match="'gpu': one of auto, cuda, cpu"):
        devices.select_device("gpu")


def _fake_gpu(monkeypatch, capability, archs, count=1) -> list:
    """torch's device queries answering for `count` GPUs of one capability; returns the set_device calls."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(devices, "compiled_archs", lambda: archs)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    return chosen


def test_gpu_without_kernels_in_the_build_refuses_even_unallocated(no_gpu_env):
    _fake_gpu(no_gpu_env, (7, 0), CU132)
    with pytest.raises(devices.DeviceError,
                       match=r"GPU 0 \(Tesla V100-SXM2-32GB, sm_70\) has no kernels in this build"):
        devices.select_device("auto")
    chosen = _fake_gpu(no_gpu_env, (7, 0), CU128, count=2)
    assert devices.select_device("auto", local_rank=3) == torch.device("cuda", 1)  # local rank 3 of 2 GPUs
    assert chosen == [1]


@pytest.mark.parametrize("entry, argv", [
    (moco_train.main, ["/nonexistent/unlabeled", "--output-dir", "{tmp}/moco"]),
    (demo_train.main, ["--stage", "r1", "--dataset-root", "/nonexistent", "--output-dir", "{tmp}/fpn"]),
    (demo_evaluate.main, ["--checkpoint-path", "/nonexistent.pth", "--dataset-root", "/nonexistent"]),
], ids=["moco.train", "demo.train", "demo.evaluate"])
def test_entry_points_refuse_before_reading_data(no_gpu_env, tmp_path, entry, argv):
    no_gpu_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as refused:
        entry(argv)
    assert str(refused.value.code).startswith("error: this job was given GPUs (CUDA_VISIBLE_DEVICES=0) but CUDA")
    # With the CPU chosen on purpose the same command goes on, to the missing data.
    with pytest.raises(SystemExit, match="nonexistent"):
        entry([*argv, "--device", "cpu"])


def test_doctor_reports_and_refuses(no_gpu_env, capsys):
    no_gpu_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    no_gpu_env.setenv("SLURM_PROCID", "2")
    no_gpu_env.setenv("SLURM_LOCALID", "0")
    assert doctor.main(["--archs", "sm_70 sm_80 sm_90"]) == 0
    out = capsys.readouterr().out
    for line in (f"torch {torch.__version__}", f"CUDA build {torch.version.cuda}",
                 "required (CUDA_ARCHS): sm_70 sm_80 sm_90: all present", "launch: slurm, rank 2 of 4",
                 "allocated GPUs: none", "device: cpu (--device auto)"):
        assert line in out
    no_gpu_env.setenv("SLURM_GPUS_ON_NODE", "4")
    assert doctor.main([]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("doctor: error: this job was given GPUs (SLURM_GPUS_ON_NODE=4)")
    assert len(captured.err.strip().splitlines()) == 1
    assert doctor.main(["--device", "cpu"]) == 0
    assert doctor.main(["--build-only", "--archs", "sm_60"]) == 1
    assert "has no kernels for sm_60, which CUDA_ARCHS names" in capsys.readouterr().err


@pytest.fixture
def backend_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision
    torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision = False, "ieee", "ieee"
    yield
    torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision = saved


def test_backend_settings_apply_to_cuda_only(backend_flags):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    devices.configure_backends(torch.device("cpu"), fixed_shapes=True)
    assert not torch.backends.cudnn.benchmark and matmul.fp32_precision == "ieee"
    devices.configure_backends(torch.device("cuda", 0), fixed_shapes=True)
    assert torch.backends.cudnn.benchmark and matmul.fp32_precision == conv.fp32_precision == "tf32"
    devices.configure_backends(torch.device("cuda", 0), fixed_shapes=False)  # detection: varying sizes
    assert not torch.backends.cudnn.benchmark


def test_true_fp32_turns_tf32_and_autocast_off_inside_only(backend_flags):
    """InfoNCE's logits and the detector's last layers run in it: TF32 would round their fp32 inputs to 10 bits."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    devices.configure_backends(torch.device("cuda", 0), fixed_shapes=True)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16
        with true_fp32("cpu"):
            assert matmul.fp32_precision == conv.fp32_precision == "ieee"
            assert (x @ x.T).dtype == torch.float32
        assert (x @ x.T).dtype == torch.bfloat16
    assert matmul.fp32_precision == conv.fp32_precision == "tf32"


def test_inference_precision_is_never_bf16_by_default(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert autocast_dtype(cuda) == torch.bfloat16
    assert autocast_dtype(cuda, inference=True) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # V100
    assert autocast_dtype(cuda) == torch.float16
    monkeypatch.setattr("moco.runtime.precision.cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), inference=True) is None
    assert autocast_dtype(torch.device("cpu"), "bf16", inference=True) == torch.bfloat16  # asked for explicitly
