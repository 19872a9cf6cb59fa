"""MoCo: momentum contrast (He et al., 2020) with the v2 improvements (Chen et al., 2020).

A query encoder learns; a key encoder follows it by momentum; a queue of K past keys supplies the negatives.
Keys are computed with shuffled batch-norm so the network cannot tell positives apart by batch statistics:
across ranks under DDP, across sub-batches (``SplitBatchNorm2d``) in a single process.

A step never waits for the GPU: the shuffle's permutation is drawn on the host, alike on every rank, and the
queue's position is kept on the host too.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .runtime.precision import true_fp32


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE logits: column 0 is the positive, columns 1..K the queue's negatives."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Nx1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # negative logits: NxK
    return torch.cat([l_pos, l_neg], dim=1) / T  # logits: Nx(1+K)


class MoCo(nn.Module):
    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        preprocess: nn.Module | None = None,
    ):
        """base_encoder: a torchvision ResNet constructor; dim: feature dimension; K: queue size;
        m: key-encoder momentum; T: softmax temperature; mlp: 2-layer projection head (MoCo v2);
        preprocess: applied to both views inside the forward (e.g. ``moco.augment.Normalize``: uint8 images in), so
        that the key images are shuffled across ranks before it, as uint8."""
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.preprocess = preprocess or nn.Identity()  # no parameters nor persistent buffers: checkpoints unchanged
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            for encoder in (self.encoder_q, self.encoder_k):
                encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), encoder.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # queue_ptr as a host int, read from the buffer once after construction or a load: reading the buffer every
        # step would make the host wait for the GPU.
        self._ptr: int | None = 0
        self.register_load_state_dict_post_hook(lambda module, incompatible: setattr(module, "_ptr", None))
        # Draws the key shuffle on the host, the same permutation on every rank: ranks that seed it alike (every
        # epoch, so a resumed run shuffles as an uninterrupted one) need no broadcast of it.
        self.shuffle_generator = torch.Generator()

    # torch.no_grad() as a context, not a decorator, here and below: `make mutate` (mutmut) skips decorated functions.
    def _momentum_update_key_encoder(self) -> None:
        """param_k <- m * param_k + (1 - m) * param_q"""
        with torch.no_grad():
            params_k = [p.data for p in self.encoder_k.parameters()]
            params_q = [p.data for p in self.encoder_q.parameters()]
            torch._foreach_lerp_(params_k, params_q, 1.0 - self.m)

    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        with torch.no_grad():
            keys = _concat_all_gather(keys)
            batch_size = keys.shape[0]
            if self.K % batch_size:
                raise ValueError(f"queue size K={self.K} must be a multiple of the total batch size {batch_size}")
            if self._ptr is None:
                self._ptr = int(self.queue_ptr)
            ptr = self._ptr
            self.queue[:, ptr : ptr + batch_size] = keys.T.to(self.queue.dtype)
            self._ptr = (ptr + batch_size) % self.K
            self.queue_ptr.fill_(self._ptr)

    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the batch (across all ranks when distributed); returns it with the index that undoes it."""
        with torch.no_grad():
            x_gather = _concat_all_gather(x)
            # On the host, so every device type (and the test) sees the same permutation.
            idx_shuffle = _to_device(torch.randperm(x_gather.shape[0], generator=self.shuffle_generator), x.device)
            idx_unshuffle = torch.argsort(idx_shuffle)
            rank_idx = idx_shuffle.view(_world_size(), -1)[_rank()]
            return x_gather[rank_idx], idx_unshuffle

    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x_gather = _concat_all_gather(x)
            return x_gather[idx_unshuffle.view(_world_size(), -1)[_rank()]]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: two views of the same N images, as ``preprocess`` takes them. Returns logits Nx(1+K) and their
        targets (all 0)."""
        q = F.normalize(self.encoder_q(self.preprocess(im_q)).float(), dim=1)  # queries: NxC
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(self.preprocess(im_k)).float(), dim=1)  # keys: NxC
            k = self._batch_unshuffle(k, idx_unshuffle)
        # Similarities over 65536 negatives need fp32: bf16, or TF32's 10-bit mantissa, would round them before the
        # temperature scales them up.
        with true_fp32(q.device.type):
            logits = contrastive_logits(q, k, self.queue.clone().detach(), self.T)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting for the GPU: a copy from pinned memory is queued."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


def _concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 (no gradient flows back), in the input's memory format.

    Every rank sends and receives one dense row-major buffer, whatever the input's strides: how NCCL treats
    buffers of other layouts (channels_last) has changed between torch releases, from raising to mixing up
    elements, while gloo copies element by element and hides it."""
    if _world_size() == 1:
        return tensor
    with torch.no_grad():
        gathered = tensor.new_empty((_world_size() * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, tensor.contiguous())
        if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
            gathered = gathered.contiguous(memory_format=torch.channels_last)
        return gathered
