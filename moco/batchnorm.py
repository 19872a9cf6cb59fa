"""Single-process stand-in for shuffle-BN: batch statistics computed per sub-batch.

Under DDP each rank normalises its own shard and MoCo shuffles keys across ranks, so a query and its key
never share batch statistics. A single process has one shard; splitting the batch into ``num_splits`` BN
sub-batches (and shuffling keys among them) recreates that, instead of letting plain BN leak the shortcut.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from each of ``num_splits`` contiguous sub-batches.

    Parameters and buffers are those of BatchNorm2d, so checkpoints are interchangeable with it.
    Running statistics are updated with the mean of the sub-batches' statistics.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.num_splits} BN sub-batches")
        outputs, means, variances = [], [], []
        for chunk in x.chunk(self.num_splits):
            # Each sub-batch updates its own copy of the running statistics; their mean is kept below.
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(
                F.batch_norm(chunk, running_mean, running_var, self.weight, self.bias, True, self.momentum, self.eps)
            )
            means.append(running_mean)
            variances.append(running_var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a SplitBatchNorm2d holding the same weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum, affine=child.affine
            ).to(device=child.weight.device if child.affine else None)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_batchnorm(child, num_splits)
    return module
