import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.builder import MoCo, contrastive_logits


def tiny_encoder(num_classes: int) -> nn.Module:
    """Stand-in for a ResNet: same attribute layout (``fc``), a handful of weights."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, num_classes))
    return model


def make_moco(K=16, dim=8, m=0.9, T=0.2, mlp=False) -> MoCo:
    torch.manual_seed(0)
    return MoCo(tiny_encoder, dim=dim, K=K, m=m, T=T, mlp=mlp)


def test_logits_and_loss_equal_direct_computation():
    torch.manual_seed(1)
    N, C, K, T = 5, 8, 12, 0.2
    q = F.normalize(torch.randn(N, C), dim=1)
    k = F.normalize(torch.randn(N, C), dim=1)
    queue = F.normalize(torch.randn(C, K), dim=0)
    logits = contrastive_logits(q, k, queue, T)
    assert logits.shape == (N, 1 + K)
    for i in range(N):
        assert torch.allclose(logits[i, 0], (q[i] * k[i]).sum() / T, atol=1e-6)
        for j in range(K):
            assert torch.allclose(logits[i, 1 + j], (q[i] * queue[:, j]).sum() / T, atol=1e-6)
    # InfoNCE: -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.queue_j/T))), averaged over the batch.
    direct = torch.stack([
        -torch.log(torch.exp(q[i] @ k[i] / T) / (torch.exp(q[i] @ k[i] / T) + torch.exp(q[i] @ queue / T).sum()))
        for i in range(N)
    ]).mean()
    loss = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    assert torch.allclose(loss, direct, atol=1e-5)


def test_forward_returns_logits_against_the_queue_before_enqueue():
    model = make_moco(K=16)
    queue_before = model.queue.clone()
    x = torch.randn(4, 3, 8, 8)
    logits, labels = model(x, x)
    assert logits.shape == (4, 17) and labels.tolist() == [0, 0, 0, 0]
    # The negatives are the queue as it was; the new keys only enter it afterwards.
    q = F.normalize(model.encoder_q(x), dim=1)
    assert torch.allclose(logits[:, 1:], q @ queue_before / model.T, atol=1e-5)
    assert torch.allclose(logits[:, 0] * model.T, (q * F.normalize(model.queue[:, :4].T, dim=1)).sum(1), atol=1e-5)


def test_queue_enqueues_in_order_and_wraps():
    model = make_moco(K=8, dim=3)
    batches = [torch.full((4, 3), float(i)) for i in range(1, 4)]
    model._dequeue_and_enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], batches[0].T)
    model._dequeue_and_enqueue(batches[1])
    assert int(model.queue_ptr) == 0  # wrapped
    assert torch.equal(model.queue[:, 4:], batches[1].T)
    model._dequeue_and_enqueue(batches[2])  # overwrites the oldest keys
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], batches[2].T) and torch.equal(model.queue[:, 4:], batches[1].T)


def test_queue_rejects_batch_that_does_not_divide_k():
    model = make_moco(K=10, dim=3)
    with pytest.raises(ValueError, match="multiple of the total batch size 4"):
        model._dequeue_and_enqueue(torch.zeros(4, 3))


def test_momentum_update_is_m_k_plus_one_minus_m_q():
    model = make_moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q = [p.clone() for p in model.encoder_q.parameters()]
    model._momentum_update_key_encoder()
    for new_k, old_k, p_q in zip(model.encoder_k.parameters(), before_k, q):
        assert torch.allclose(new_k, 0.9 * old_k + 0.1 * p_q, atol=1e-6)
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_key_encoder_starts_as_copy_and_mlp_head_has_facebook_layout():
    model = make_moco(mlp=True)
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(p_q, p_k)
    keys = set(model.state_dict())
    assert {"encoder_q.fc.0.weight", "encoder_q.fc.2.weight", "encoder_k.fc.0.weight", "queue", "queue_ptr"} <= keys


def test_shuffle_and_unshuffle_are_inverse():
    model = make_moco()
    model.shuffle_generator.manual_seed(3)
    x = torch.arange(16.0).view(8, 2)
    shuffled, idx_unshuffle = model._batch_shuffle(x)
    assert not torch.equal(shuffled, x)  # a real permutation (fixed seed)
    assert sorted(shuffled[:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert torch.equal(model._batch_unshuffle(shuffled, idx_unshuffle), x)


def test_shuffle_is_reproducible_from_its_seed():
    model = make_moco()
    x = torch.arange(8.0).view(8, 1)
    model.shuffle_generator.manual_seed(5)
    first, _ = model._batch_shuffle(x)
    model.shuffle_generator.manual_seed(5)
    second, _ = model._batch_shuffle(x)
    assert torch.equal(first, second)


def test_gradients_reach_only_the_query_encoder():
    model = make_moco()
    x = torch.randn(4, 3, 8, 8)
    logits, labels = model(x, torch.randn(4, 3, 8, 8))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
