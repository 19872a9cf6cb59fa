import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from moco.batchnorm import SplitBatchNorm2d, convert_split_batchnorm


def test_training_statistics_are_per_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=2)
    # Two sub-batches, the even and the odd images, with very different statistics: full-batch BN would mix them.
    x = torch.stack([torch.randn(4, 3, 5, 5) * 2 + 5, torch.randn(4, 3, 5, 5) * 0.5 - 3], dim=1).flatten(0, 1)
    y = bn(x)
    for chunk_in, chunk_out in ((x[k::2], y[k::2]) for k in range(2)):
        mean = chunk_in.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk_in.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        assert torch.allclose(chunk_out, (chunk_in - mean) / torch.sqrt(var + bn.eps), atol=1e-4)
        # Each sub-batch is normalised on its own: zero mean, unit variance.
        assert torch.allclose(chunk_out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    full = nn.BatchNorm2d(3)(x)
    assert not torch.allclose(y, full, atol=1e-2)


def test_running_statistics_average_the_sub_batches():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(2, num_splits=2, momentum=0.5)
    x = torch.stack([torch.randn(3, 2, 4, 4) + 2, torch.randn(3, 2, 4, 4) - 4], dim=1).flatten(0, 1)
    bn(x)
    chunk_means = torch.stack([x[k::2].mean(dim=(0, 2, 3)) for k in range(2)])
    chunk_vars = torch.stack([x[k::2].var(dim=(0, 2, 3), unbiased=True) for k in range(2)])
    assert torch.allclose(bn.running_mean, 0.5 * torch.zeros(2) + 0.5 * chunk_means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.5 * torch.ones(2) + 0.5 * chunk_vars.mean(0), atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_gradients_flow_and_eval_uses_running_statistics():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(2, num_splits=2)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    bn(x).square().sum().backward()
    assert x.grad is not None and bn.weight.grad is not None
    bn.eval()
    plain = nn.BatchNorm2d(2)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.equal(bn(x), plain(x))


def test_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split into 4"):
        SplitBatchNorm2d(2, num_splits=4)(torch.randn(6, 2, 3, 3))


def test_conversion_keeps_weights_and_checkpoint_keys():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    convert_split_batchnorm(model, 4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 4 for m in bns)
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_sub_batches_use_the_layers_eps_and_name_the_batch_size():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(2, num_splits=2, eps=0.5)
    x = torch.randn(4, 2, 3, 3)
    y = bn(x)
    for chunk_in, chunk_out in ((x[k::2], y[k::2]) for k in range(2)):
        var = chunk_in.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        assert torch.allclose(chunk_out, (chunk_in - chunk_in.mean(dim=(0, 2, 3), keepdim=True)) / (var + 0.5).sqrt(),
                              atol=1e-5)
    with pytest.raises(ValueError, match="batch of 6 does not split into 4 BN sub-batches"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 3, 3))


def test_conversion_keeps_eps_momentum_affine_and_device():
    model = nn.Sequential(nn.BatchNorm2d(3, eps=0.01, momentum=0.3), nn.BatchNorm2d(2, affine=False))
    convert_split_batchnorm(model, 2)
    assert (model[0].eps, model[0].momentum, model[0].affine) == (0.01, 0.3, True)
    assert model[1].affine is False and model[1].weight is None
    on_meta = convert_split_batchnorm(nn.Sequential(nn.BatchNorm2d(3)).to("meta"), 2)  # meta stands in for a GPU
    assert isinstance(on_meta[0], SplitBatchNorm2d) and on_meta[0].weight.device.type == "meta"


def _blocks(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def sub_batches(x: torch.Tensor, num_splits: int) -> list[torch.Tensor]:
    """The definition: sub-batch k is ``x[k::num_splits]`` in NCHW and the k-th contiguous block in NHWC."""
    return list(x.chunk(num_splits)) if _blocks(x) else [x[k::num_splits] for k in range(num_splits)]


def _per_sub_batch(bn: nn.BatchNorm2d, x: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, ...]:
    """F.batch_norm on each sub-batch alone, running statistics averaged over the sub-batches."""
    outputs, means, variances = [], [], []
    for part in sub_batches(x, num_splits):
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        outputs.append(F.batch_norm(part, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps))
        means.append(mean)
        variances.append(var)
    y = torch.cat(outputs) if _blocks(x) else torch.stack(outputs, dim=1).flatten(0, 1)  # the images' order
    return y, torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_call_equals_a_loop_over_sub_batches(affine, channels_last):
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(5, num_splits=4, affine=affine, momentum=0.3)
    if affine:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    reference = nn.BatchNorm2d(5, affine=affine, momentum=0.3)
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(12, 5, 6, 7) * torch.linspace(0.5, 3, 12).view(12, 1, 1, 1)  # sub-batches differ in scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = bn(x1)
    y_ref, mean_ref, var_ref = _per_sub_batch(reference, x2, 4)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(bn.running_mean, mean_ref, atol=1e-6)
    assert torch.allclose(bn.running_var, var_ref, atol=1e-6)
    if affine:
        assert torch.allclose(bn.weight.grad, reference.weight.grad, atol=1e-4)
        assert torch.allclose(bn.bias.grad, reference.bias.grad, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
