"""Momentum encoder, queue and shuffle-BN (single-process emulation; the multi-rank path is in test_train.py)."""

import pytest
import torch
from torch import nn

from cvtcl.models import Encoder
from cvtcl.moco import MomentumContrast, Queue, check_queue_size, shuffled_encode


def test_queue_enqueue_wraps_and_fills():
    queue = Queue(size=6, dim=4)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(6))
    assert not queue.is_full and queue.video_index.tolist() == [-1] * 6
    for step in range(4):
        keys = torch.full((2, 4), float(step))
        queue.enqueue(keys, torch.tensor([10 * step, 10 * step + 1]), torch.tensor([step, step]))
    # 4 batches of 2 into 6 slots: the 4th batch overwrote slots 0-1.
    assert queue.video_index.tolist() == [30, 31, 10, 11, 20, 21]
    assert queue.group.tolist() == [3, 3, 1, 1, 2, 2]
    assert queue.keys[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert int(queue.ptr) == 2 and queue.is_full


def test_queue_size_must_divide_by_global_batch():
    check_queue_size(2048, 128)
    with pytest.raises(ValueError, match=r"loss.queue_size=2048 .*global batch 96.*loss.queue_size=2016"):
        check_queue_size(2048, 96)
    with pytest.raises(ValueError, match="divisible"):
        Queue(size=5, dim=4).enqueue(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_momentum_update_is_an_ema_of_parameters_only():
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=8), queue_size=4)
    assert all(not p.requires_grad for p in model.key.parameters())
    key_before = [p.clone() for p in model.key.parameters()]
    with torch.no_grad():
        for p in model.query.parameters():
            p.add_(1.0)
    model.momentum_update(0.9)
    for before, p_k, p_q in zip(key_before, model.key.parameters(), model.query.parameters()):
        torch.testing.assert_close(p_k, 0.9 * before + 0.1 * p_q)


class RowStats(nn.Module):
    """Returns each row's value next to the mean of its BN group, so the grouping is visible."""

    def forward(self, x):
        return torch.stack([x[:, 0], x[:, 0].mean().expand(len(x))], dim=1)


def test_shuffle_bn_emulation_splits_into_random_groups_and_restores_order():
    x = (2.0 ** torch.arange(8.0)).view(8, 1)  # every subset has its own mean
    out = shuffled_encode(RowStats(), x, torch.Generator().manual_seed(0), bn_groups=2)
    assert out[:, 0].tolist() == x[:, 0].tolist()  # rows come back in input order
    group_means = sorted(set(out[:, 1].tolist()))
    assert len(group_means) == 2  # two BN groups ...
    assert group_means != [3.75, 60.0]  # ... drawn at random, not the contiguous halves (seed 0)
    again = shuffled_encode(RowStats(), x, torch.Generator().manual_seed(0), bn_groups=2)
    torch.testing.assert_close(out, again)  # a pure function of the generator's seed


def test_shuffle_is_invisible_without_batch_statistics():
    torch.manual_seed(0)
    encoder = Encoder("rgb", "tiny").eval()
    x = torch.randn(6, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(shuffled_encode(encoder, x, torch.Generator().manual_seed(1), 3), encoder(x),
                                   rtol=1e-4, atol=1e-5)


def test_one_bn_group_is_refused():
    with pytest.raises(ValueError, match="bn_groups"):
        MomentumContrast(Encoder("rgb", "tiny"), queue_size=4, bn_groups=1)
