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
    """BatchNorm2d whose training statistics come from each of ``num_splits`` sub-batches.

    The sub-batches are those the batch's memory layout holds for free: in NCHW sub-batch k is every
    ``num_splits``-th image from the k-th, ``x[k::num_splits]``, and one ``batch_norm`` call over a view whose
    channels are (sub-batch, channel) normalises them all; in NHWC (channels_last) it is the k-th contiguous block of
    ``batch / num_splits`` images, each block normalised by its own call. Either grouping in the other layout costs
    a copy of the batch in and out of every layer (2-4x plain BatchNorm's time in NHWC; +30 % in NCHW). The
    loader's order and the key shuffle are random, so which images share statistics is equally random either way.

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
        n, c, h, w = x.shape
        s = self.num_splits
        # Each sub-batch's call updates its own copy of the running statistics; the copies are averaged below.
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = torch.cat([F.batch_norm(block, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
                           for block, mean, var in zip(x.chunk(s), running_mean.view(s, c), running_var.view(s, c))])
        else:
            grouped = x.reshape(n // s, s * c, h, w)  # image i*s + k, channel j -> row i, channel k*c + j
            weight, bias = (self.weight.repeat(s), self.bias.repeat(s)) if self.affine else (None, None)
            y = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, self.momentum, self.eps)
            y = y.view(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y

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
