"""Mixed precision: which dtype each mode picks, loss scaling for fp16, and the scaler surviving a resume."""
import pytest
import torch
import torch.nn as nn

from moco.runtime import checkpoint, precision, preemption
from moco.runtime.precision import autocast_dtype, cpu_has_native_bf16, optimizer_step
from moco.train import main

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA device object needs no GPU until used


def test_explicit_modes_whatever_the_device():
    for device in (CPU, CUDA):
        assert autocast_dtype(device, "off") is None
        assert autocast_dtype(device, "bf16") == torch.bfloat16
        assert autocast_dtype(device, "fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown precision mode 'fp8'"):
        autocast_dtype(CPU, "fp8")


def test_auto_picks_bf16_on_ampere_and_fp16_on_older_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert autocast_dtype(CUDA) == torch.bfloat16  # native bf16 (Ampere+), not emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(CUDA) == torch.float16  # a V100: bf16 only emulated


def test_auto_on_the_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(CPU) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(CPU) is None
    assert autocast_dtype(torch.device("meta")) is None  # neither CUDA nor CPU: fp32


@pytest.mark.parametrize("flags, native", [
    ("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
    (None, False),  # no /proc/cpuinfo (macOS)
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, native):
    class FakePath:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self):
            if flags is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return flags

    monkeypatch.setattr(precision, "Path", FakePath)
    assert cpu_has_native_bf16() is native


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    return layer


def _loss(layer, scale=1.0):
    return (layer(torch.tensor([[3.0, 4.0]])) * scale).sum()  # d loss / d weight = [3, 4] * scale


def test_plain_steps_apply_fresh_gradients():
    layer = _linear()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    optimizer_step(_loss(layer), optimizer, None)
    optimizer_step(_loss(layer), optimizer, None)  # gradients of the first step are not added again
    assert torch.allclose(layer.weight, torch.tensor([[1.0 - 0.6, -2.0 - 0.8]]))


def test_fp16_loss_scaling_unscales_before_the_step_and_skips_overflows():
    layer = _linear()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer_step(_loss(layer), optimizer, scaler)
    assert torch.allclose(layer.weight, torch.tensor([[0.7, -2.4]]))  # the step of the unscaled gradient
    assert scaler.get_scale() == 1024.0
    optimizer_step(_loss(layer), optimizer, scaler)
    assert torch.allclose(layer.weight, torch.tensor([[0.4, -2.8]]))
    assert optimizer_step(_loss(layer, float("inf")), optimizer, scaler) is False  # overflow: no step, scale halves
    assert torch.allclose(layer.weight, torch.tensor([[0.4, -2.8]]))
    assert scaler.get_scale() == 512.0
    assert optimizer_step(_loss(layer), optimizer, scaler) is True


def test_a_step_the_grad_scaler_skipped_leaves_the_lr_schedule_where_it_was():
    """Fine-tuning's warm-up counts updates, not batches: an fp16 overflow (a finite loss whose scaled gradient is
    not) skips the update and must not advance it."""
    from demo import engine
    from moco.runtime.unreadable import UnreadableFiles

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            # A bright image's loss 3e35 is finite, but its gradient scaled by 65536 overflows fp32; a dark one's not.
            return {"loss_a": self.w.sum() * (3e35 if images[0].sum() > 0.5 else 1.0)}

    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / 10))
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    loader = [([torch.full((1, 1, 1), value, dtype=torch.uint8)], None, [-1], [""]) for value in (255, 0)]
    engine.train_one_epoch(model, loader, optimizer, scheduler, scaler, None, torch.device("cpu"), 0, 0,
                           UnreadableFiles(0, torch.device("cpu")))
    assert scheduler.last_epoch == 1  # two batches, one update


def _stop_at_first_step(monkeypatch):
    monkeypatch.setattr(preemption, "stop_requested", lambda *args, **kwargs: True)


def _tiny_run(data, out, precision_mode):
    return [str(data / "train"), "--output-dir", str(out), "-a", "resnet18", "--image-size", "32", "-b", "32",
            "--moco-k", "64", "-j", "0", "--bn-splits", "4", "--epochs", "2", "--precision", precision_mode]


@pytest.mark.parametrize("mode, has_scaler", [("fp16", True), ("bf16", False), ("off", False)])
def test_pretraining_keeps_a_loss_scaler_only_for_fp16(tiny_data, tmp_path, monkeypatch, mode, has_scaler):
    _stop_at_first_step(monkeypatch)
    with pytest.raises(SystemExit):
        main(_tiny_run(tiny_data, tmp_path, mode))
    saved = checkpoint.load(tmp_path / checkpoint.LAST)
    assert (saved["scaler"] is not None) == has_scaler


def test_resumed_pretraining_restores_the_loss_scale(tiny_data, tmp_path, monkeypatch):
    """A stop before the first step saves the scaler as the run holds it: after a resume, as the checkpoint had
    it (a scale of 8 after many overflows), not a fresh 65536."""
    _stop_at_first_step(monkeypatch)
    with pytest.raises(SystemExit):
        main(_tiny_run(tiny_data, tmp_path, "fp16"))
    saved = checkpoint.load(tmp_path / checkpoint.LAST)
    assert saved["scaler"]["scale"] == 65536.0
    saved["scaler"] = {**saved["scaler"], "scale": 8.0, "_growth_tracker": 17}
    checkpoint.save_atomic(saved, tmp_path / checkpoint.LAST)
    with pytest.raises(SystemExit):
        main(_tiny_run(tiny_data, tmp_path, "fp16"))
    resumed = checkpoint.load(tmp_path / checkpoint.LAST)
    assert (resumed["scaler"]["scale"], resumed["scaler"]["_growth_tracker"]) == (8.0, 17)
