"""MoCo's forward pinned against values computed here, step by step, from the paper's definition.

Unlike test_builder's forward test, the key encoder differs from the query encoder, the key view differs from the
query view, and BatchNorm is split: a forward that skips the momentum update, computes keys with the query
encoder, or leaves out the batch shuffle gives other keys and fails.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_builder import tiny_encoder

from moco.batchnorm import SplitBatchNorm2d, convert_split_batchnorm
from moco.builder import MoCo
from moco.train import build_model, get_parser

N, SPLITS, M, T = 8, 2, 0.9, 0.2


def _moco_with_split_bn(seed: int = 0) -> MoCo:
    torch.manual_seed(seed)
    model = MoCo(tiny_encoder, dim=8, K=16, m=M, T=T)
    convert_split_batchnorm(model, SPLITS)
    with torch.no_grad():  # the query encoder has trained away from the key encoder
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    return model.train()


def _permutation(seed: int) -> torch.Tensor:
    """The key shuffle as documented: torch.randperm on a CPU generator seeded by the caller."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))


def test_forward_updates_the_key_encoder_then_keys_it_with_shuffled_split_bn():
    model = _moco_with_split_bn()
    torch.manual_seed(1)
    im_q, im_k = torch.randn(N, 3, 8, 8), torch.randn(N, 3, 8, 8)
    perm = _permutation(7)
    # Sub-batch k is positions k, k + SPLITS, ...: the shuffle moves images across BN sub-batches.
    assert set(perm[::SPLITS].tolist()) != set(range(0, N, SPLITS))

    # Expected key encoder: m * k + (1 - m) * q, parameter by parameter, before the keys are computed.
    expected_k = copy.deepcopy(model.encoder_k)
    with torch.no_grad():
        for p_k, p_q in zip(expected_k.parameters(), model.encoder_q.parameters()):
            p_k.copy_(M * p_k + (1 - M) * p_q)
        shuffled_keys = F.normalize(expected_k(im_k[perm]), dim=1)
        keys = torch.empty_like(shuffled_keys)
        keys[perm] = shuffled_keys  # row i: the key of image i, normalised within the sub-batch it was shuffled to
        q = F.normalize(copy.deepcopy(model.encoder_q)(im_q), dim=1)
    queue_before = model.queue.clone()

    model.shuffle_generator.manual_seed(7)
    logits, labels = model(im_q, im_k)

    for p_new, p_expected in zip(model.encoder_k.parameters(), expected_k.parameters()):
        assert torch.allclose(p_new, p_expected, atol=1e-6)
    assert torch.allclose(logits[:, 0], (q * keys).sum(1) / T, atol=1e-5)
    assert torch.allclose(logits[:, 1:], q @ queue_before / T, atol=1e-5)
    assert torch.allclose(model.queue[:, :N], keys.T, atol=1e-6)  # the keys, in image order, are enqueued
    assert labels.tolist() == [0] * N


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_keys_batch_statistics_come_from_another_sub_batch_than_its_querys(channels_last):
    """The shortcut shuffle-BN closes: without the shuffle, image i's key would be normalised together with the
    same images as its query, and the positive could be found by batch statistics alone. Sub-batches are
    positions k, k + SPLITS, ... in NCHW and contiguous blocks in NHWC (see moco.batchnorm)."""
    model = _moco_with_split_bn()
    torch.manual_seed(2)
    im = torch.randn(N, 3, 8, 8)
    if channels_last:
        model, im = model.to(memory_format=torch.channels_last), im.contiguous(memory_format=torch.channels_last)
    model.shuffle_generator.manual_seed(7)
    model(im, im)
    key = model.queue[:, :N].T
    perm = _permutation(7)

    def sub_batch(order: torch.Tensor, position: int) -> torch.Tensor:
        if channels_last:
            block = N // SPLITS
            return order[position // block * block:(position // block + 1) * block]
        return order[position % SPLITS::SPLITS]

    # Image i went to position j = where(perm == i); its sub-batch holds the images sub_batch(perm, j).
    encoder_k = copy.deepcopy(model.encoder_k)  # already updated by the forward
    for bn in encoder_k.modules():  # fed one sub-batch at a time below: plain batch statistics over it
        if isinstance(bn, SplitBatchNorm2d):
            bn.num_splits = 1
    with torch.no_grad():
        moved = 0
        for i in range(N):
            j = int((perm == i).nonzero())
            block = sub_batch(perm, j)
            own = sub_batch(torch.arange(N), i).tolist()
            from_block = F.normalize(encoder_k(im[block]), dim=1)[int((block == i).nonzero())]
            assert torch.allclose(key[i], from_block, atol=1e-5)
            if sorted(block.tolist()) != own:
                moved += 1
                from_own = F.normalize(encoder_k(im[own]), dim=1)[own.index(i)]
                assert not torch.allclose(key[i], from_own, atol=1e-3)
    assert moved > 0


def test_split_bn_replaces_every_batch_norm_of_both_encoders():
    args = get_parser().parse_args(["data", "-a", "resnet18", "--moco-k", "64", "--bn-splits", "4"])
    model = build_model(args, world_size=1)
    for encoder in (model.encoder_q, model.encoder_k):
        bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 20  # ResNet-18: stem, 2 per basic block (8 blocks), 3 downsample paths
        assert all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 4 for m in bns)


def test_contrastive_logits_stay_fp32_under_bf16_autocast():
    """Similarities over many negatives need fp32: bf16 would round them before the temperature scales them."""
    torch.manual_seed(3)
    model = MoCo(tiny_encoder, dim=8, K=16, m=M, T=0.07)
    model.queue.copy_(F.normalize(torch.randn(8, 16), dim=0))
    queue = model.queue.clone()
    im_q, im_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(im_q, im_k)
    assert logits.dtype == torch.float32
    # The same keys and queries (from the queue and a bf16 query pass), multiplied in fp32.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = F.normalize(model.encoder_q(im_q).float(), dim=1)
    k = model.queue[:, :4].T
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.07, atol=1e-4)
    assert torch.allclose(logits[:, 1:], q @ queue / 0.07, atol=1e-4)


def test_queue_pointer_advances_by_the_batch_when_k_is_not_twice_the_batch():
    model = MoCo(tiny_encoder, dim=3, K=12)
    for step, expected_ptr in enumerate((4, 8, 0, 4)):
        keys = torch.full((4, 3), float(step + 1))
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == expected_ptr
    assert model.queue[0].tolist() == [4.0] * 4 + [2.0] * 4 + [3.0] * 4  # the fourth batch replaced the first


class _TwoRankGroup:
    """torch.distributed as rank 1 of 2 sees it; rank 0's contributions to each all_gather are given in order."""

    def __init__(self, rank0_sends):
        self.rank0_sends, self.broadcasts = iter(rank0_sends), []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_rank(self):
        return 1

    def all_gather_into_tensor(self, out, tensor):
        assert out.is_contiguous() and tensor.is_contiguous()  # dense buffers only, whatever the layout
        n = tensor.shape[0]
        out[:n].copy_(next(self.rank0_sends))
        out[n:].copy_(tensor)

    def broadcast(self, tensor, src):
        self.broadcasts.append((tensor.clone(), src))


def test_shuffle_and_queue_across_two_ranks(monkeypatch):
    """Rank 1's view of shuffle-BN under DDP: the global batch is shuffled, each rank keys its own slice, the keys
    return to their images, and the queue takes the keys of both ranks."""
    import moco.builder as builder

    mine, theirs = torch.arange(4.0, 8.0).view(4, 1), torch.arange(0.0, 4.0).view(4, 1)
    full = torch.cat([theirs, mine])  # rank order
    perm = _permutation(3)
    group = _TwoRankGroup([theirs, full[perm[:4]], torch.full((4, 1), -1.0)])
    monkeypatch.setattr(builder, "dist", group)
    model = MoCo(tiny_encoder, dim=1, K=16)
    model.shuffle_generator.manual_seed(3)
    shuffled, idx_unshuffle = model._batch_shuffle(mine)
    assert torch.equal(shuffled, full[perm[4:]])  # this rank's slice of the shuffled global batch
    assert not group.broadcasts  # every rank draws the same permutation from its equally seeded generator
    assert torch.equal(model._batch_unshuffle(shuffled, idx_unshuffle), mine)
    model._dequeue_and_enqueue(mine)
    assert model.queue[0, :8].tolist() == [-1.0] * 4 + [4.0, 5.0, 6.0, 7.0] and int(model.queue_ptr) == 8


def test_defaults_queue_and_head_as_in_the_paper():
    """MoCo's defaults (He et al. 2020): 128-d keys, a queue of 65536 unit keys, m = 0.999, T = 0.07, a linear
    head; v2's MLP head is Linear-ReLU-Linear. The queue pointer is an int64 buffer, as in the released
    checkpoints."""
    model = MoCo(tiny_encoder)
    assert tuple(model.queue.shape) == (128, 65536) and (model.K, model.m, model.T) == (65536, 0.999, 0.07)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(65536), atol=1e-5)
    assert isinstance(model.encoder_q.fc, nn.Linear) and model.queue_ptr.dtype == torch.int64
    head = MoCo(tiny_encoder, dim=8, K=16, mlp=True).encoder_q.fc
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Linear]
    x = torch.randn(5, 4)
    assert torch.allclose(head(x), head[2](torch.relu(head[0](x))))


def _two_rank_step(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of a 2-rank gloo group: a channels_last gather, then one DDP MoCo step on its half of the
    batch, as moco.train builds it (uint8 views normalised inside, no buffer broadcast)."""
    import torch.distributed as dist

    from moco.augment import Normalize
    from moco.builder import _concat_all_gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images = _two_rank_images()
        half = images[rank * 4:(rank + 1) * 4]
        gathered = _concat_all_gather(half.float().contiguous(memory_format=torch.channels_last))
        model = _two_rank_model(Normalize(memory_format=torch.channels_last), 1)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
        logits, labels = ddp(half, half.flip(-1))
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        torch.save({"gathered": gathered, "logits": logits.detach(), "state": model.state_dict()}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_rank_images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _two_rank_model(preprocess, splits: int) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=16, m=0.9, T=0.2, preprocess=preprocess)
    if splits > 1:
        convert_split_batchnorm(model, splits)
    model.shuffle_generator.manual_seed(7)
    return model.to(memory_format=torch.channels_last).train()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_whole_batch_in_channels_last(tmp_path):
    """Shuffle-BN under DDP: channels_last inputs gather to the whole batch, and one step of two ranks (each its
    half) equals one process over the whole batch whose split BN makes the same two sub-batches (in NHWC, the
    contiguous halves): logits, weights, queue and pointer, which both ranks then hold alike."""
    import socket

    import torch.multiprocessing as mp

    from moco.augment import Normalize

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_step, args=(port, str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    images = _two_rank_images()
    assert all(torch.equal(r["gathered"], images.float()) for r in ranks)
    assert ranks[0]["gathered"].is_contiguous(memory_format=torch.channels_last)

    model = _two_rank_model(Normalize(memory_format=torch.channels_last), 2)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    logits, labels = model(images, images.flip(-1))
    F.cross_entropy(logits, labels).backward()
    optimizer.step()
    assert torch.allclose(torch.cat([r["logits"] for r in ranks]), logits.detach(), atol=1e-5)
    reference = model.state_dict()
    for name in ("queue", "queue_ptr", "encoder_q.conv.weight", "encoder_k.conv.weight", "encoder_q.fc.weight"):
        for r in ranks:
            assert torch.allclose(r["state"][name].float(), reference[name].float(), atol=1e-5), name
    assert torch.equal(ranks[0]["state"]["queue"], ranks[1]["state"]["queue"])
