"""Stage-2 mining: the positive mask, the multi-positive loss and self-positive dropping."""

import math

import pytest
import torch
import torch.nn.functional as F

from cvtcl.mining import (
    NO_ID,
    chance_precision,
    cross_view_nce,
    drop_self_positive,
    mine_topk,
    mining_precision,
    multi_positive_nce,
    positive_mask,
    self_positive_drop,
    source_mask,
)
from cvtcl.engine import step_generator
from cvtcl.moco import Queue


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _ids(*values):
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------- the positive mask (eqs. 3, 5)

def test_mask_hand_built_case():
    # 2 queries, 6 queue entries; sampler embeddings on the unit circle so the ranking is obvious.
    angle = torch.tensor([0.0, 0.1, 0.2, 0.3, 3.1, 1.5])
    queue_s = torch.stack([angle.cos(), angle.sin()], dim=1)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # query 0 points at angle 0, query 1 at pi/2
    queue_video = _ids(10, 11, 12, 13, 14, 15)
    queue_group = _ids(1, 2, 3, 3, 4, 5)
    # query 0 is video 10 (group 1); query 1 is video 99 of group 3.
    pos = positive_mask(s, queue_s, _ids(10, 99), _ids(1, 3), queue_video, queue_group, topk=2, queue_full=True)
    expected = torch.tensor([
        # own | 10    11     12     13     14     15
        [True, True, True, True, False, False, False],   # own video 10 (group 1); top-2 of rest: 11, 12
        [True, False, True, True, True, False, True],    # group 3 = {12, 13}; top-2 of rest: 15, 11
    ])
    # query 1 at pi/2: cos similarity to angles [0, .1, .2, .3, 3.1, 1.5] excluding 12, 13 -> 15 (1.5), 11 (.1)
    assert torch.equal(pos.mask, expected)
    assert torch.equal(pos.mined, torch.tensor([
        [False, True, True, False, False, False],
        [False, True, False, False, False, True],
    ]))


def test_topk_never_picks_own_or_group_even_if_most_similar():
    queue_s = _unit(8, 4, seed=1)
    s = queue_s[[3, 5]].clone()  # each query is identical to an excluded entry
    queue_video = torch.arange(8)
    queue_group = _ids(0, 0, 1, 1, 2, 2, 3, 3)
    pos = positive_mask(s, queue_s, _ids(3, 100), _ids(NO_ID, 2), queue_video, queue_group, topk=3, queue_full=True)
    assert not pos.mined[0, 3] and pos.mask[0, 1 + 3]  # own video: positive, but not "mined"
    assert not pos.mined[1, 4] and not pos.mined[1, 5]  # same group 2
    assert pos.mask[1, 1 + 4] and pos.mask[1, 1 + 5]
    assert pos.mined.sum(1).tolist() == [3, 3]


def test_warm_up_mines_nothing():
    queue_s = _unit(8, 4, seed=2)
    s = _unit(3, 4, seed=3)
    queue_video, queue_group = torch.arange(8), torch.arange(8) // 2
    warm = positive_mask(s, queue_s, _ids(0, 5, 50), _ids(0, 2, 9), queue_video, queue_group, topk=5, queue_full=False)
    assert not warm.mined.any()
    assert warm.mask[:, 0].all()
    assert warm.mask[0, 1:].nonzero().flatten().tolist() == [0, 1]  # own video 0 + group 0 = {0, 1}
    assert warm.mask[1, 1:].nonzero().flatten().tolist() == [4, 5]
    assert warm.mask[2, 1:].sum() == 0


def test_empty_slots_and_unknown_groups_match_nothing():
    queue_video = _ids(NO_ID, NO_ID, 4)
    queue_group = _ids(NO_ID, NO_ID, NO_ID)
    src = source_mask(_ids(NO_ID, 4), _ids(NO_ID, NO_ID), queue_video, queue_group)
    assert src.tolist() == [[False, False, False], [False, False, True]]


def test_video_and_group_index_zero_are_real_ids():
    """Video and group ids count from 0; only negative ids (NO_ID) mean "unknown". The first video
    of the dataset matches its own earlier clips, and group 0 matches itself."""
    assert source_mask(_ids(0), _ids(NO_ID), _ids(0), _ids(NO_ID)).tolist() == [[True]]
    assert source_mask(_ids(5), _ids(0), _ids(7), _ids(0)).tolist() == [[True]]


def test_topk_larger_than_admissible_takes_all_admissible_only():
    exclude = torch.tensor([[True, True, False, True]])
    mined = mine_topk(_unit(1, 4, seed=4), _unit(4, 4, seed=5), exclude, topk=5)
    assert mined.tolist() == [[False, False, True, False]]
    assert not mine_topk(_unit(1, 4), _unit(4, 4), exclude, topk=0).any()


# ---------------------------------------------------------------- multi-positive NCE (eqs. 2, 4)

def _naive_multi_positive(logits, mask):
    total = 0.0
    for row, m in zip(logits, mask):
        numerator = sum(torch.exp(row[j]) for j in range(len(row)) if m[j])
        denominator = sum(torch.exp(row[j]) for j in range(len(row)))
        total = total - torch.log(numerator / denominator)
    return total / len(logits)


def _info_nce_reference(q, k, queue, tau):
    """Eq. 1 with a loop over rows: CE([q·k⁺, q·queue] / τ, 0)."""
    losses = []
    for qi, ki in zip(q, k):
        logits = torch.cat([(qi * ki).sum()[None], queue @ qi]) / tau
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    return torch.stack(losses).mean()


def test_multi_positive_matches_naive_loop_values_and_gradients():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(5, 9, generator=gen) * 3).requires_grad_()
    mask = torch.rand(5, 9, generator=gen) < 0.3
    mask[:, 0] |= ~mask.any(1)  # every row needs a positive
    fast = multi_positive_nce(logits, mask)
    (grad_fast,) = torch.autograd.grad(fast, logits)
    slow = _naive_multi_positive(logits.double(), mask)
    (grad_slow,) = torch.autograd.grad(slow, logits)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fast, grad_slow.float(), rtol=1e-5, atol=1e-6)


def test_topk_zero_without_groups_equals_info_nce():
    tau = 0.07
    q, k, queue = _unit(6, 16, seed=7), _unit(6, 16, seed=8), _unit(12, 16, seed=9)
    queue_video, queue_group = torch.arange(100, 112), torch.full((12,), NO_ID)
    query_video, query_group = torch.arange(6), torch.full((6,), NO_ID)
    pos = positive_mask(_unit(6, 16), _unit(12, 16), query_video, query_group, queue_video, queue_group,
                        topk=0, queue_full=True)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / tau
    torch.testing.assert_close(multi_positive_nce(logits, pos.mask), _info_nce_reference(q, k, queue, tau))
    torch.testing.assert_close(multi_positive_nce(logits, pos.mask), F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)))


def test_stable_at_small_temperature_and_empty_rows_are_not_finite():
    logits = torch.tensor([[900.0, -900.0, 800.0]])
    mask = torch.tensor([[False, True, False]])
    assert math.isfinite(float(multi_positive_nce(logits, mask)))
    # no host check inside the step: an empty row gives +inf, which the trainer's non-finite check reports
    assert float(multi_positive_nce(logits, torch.zeros(1, 3, dtype=torch.bool))) == math.inf


# ---------------------------------------------------------------- self-positive dropping

def _mask_with_lonely_row():
    return torch.tensor([[True, True, False], [True, False, False]])  # row 1 has only its own key


def test_dropping_keeps_denominator_and_lonely_rows():
    mask = _mask_with_lonely_row()
    dropped = drop_self_positive(mask, torch.tensor(True))
    assert dropped.tolist() == [[False, True, False], [True, False, False]]
    assert torch.equal(mask, _mask_with_lonely_row())  # input untouched
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    expected_row0 = -(1.0 - torch.logsumexp(torch.tensor([2.0, 1.0, 0.0]), 0))
    expected_row1 = -(0.5 - torch.logsumexp(torch.tensor([0.5, 0.0, 0.0]), 0))
    torch.testing.assert_close(multi_positive_nce(logits, dropped), (expected_row0 + expected_row1) / 2)
    assert torch.equal(drop_self_positive(mask, torch.tensor(False)), mask)


def test_dropping_rate_and_determinism():
    def dropped_steps(seed):
        return [self_positive_drop(0.9, step_generator(seed, step)) for step in range(2000)]

    first = dropped_steps(seed=3)
    assert first == dropped_steps(seed=3)  # resume / every rank draws the same
    assert first != dropped_steps(seed=4)
    rate = sum(first) / len(first)
    assert abs(rate - 0.9) < 4 * math.sqrt(0.9 * 0.1 / len(first)), rate  # binomial, 4 sigma
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        self_positive_drop(1.5, step_generator(0, 0))


# ---------------------------------------------------------------- queue and mining quality

def test_cross_view_queue_fills_wraps_and_round_trips_state():
    queue = Queue(6, 4, cross_view=True)
    assert not queue.is_full and (queue.label == NO_ID).all()
    for step in range(4):
        ids = torch.arange(3) + 3 * step
        queue.enqueue(_unit(3, 4, seed=step), ids, ids // 2, sampler=_unit(3, 4, seed=10 + step), label=ids % 2)
        assert queue.is_full == (step >= 1)
    assert queue.video_index.tolist() == [6, 7, 8, 9, 10, 11] and int(queue.ptr) == 0
    assert queue.label.tolist() == [0, 1, 0, 1, 0, 1]
    torch.testing.assert_close(queue.keys[:3], _unit(3, 4, seed=2))
    torch.testing.assert_close(queue.sampler[3:], _unit(3, 4, seed=13))
    restored = Queue(6, 4, cross_view=True)
    restored.load_state_dict(queue.state_dict())
    assert restored.is_full and torch.equal(restored.sampler, queue.sampler)
    with pytest.raises(ValueError, match="needs sampler and label"):
        queue.enqueue(_unit(3, 4), ids, ids)
    with pytest.raises(ValueError, match="a plain queue neither"):
        Queue(6, 4).enqueue(_unit(3, 4), ids, ids, sampler=_unit(3, 4), label=ids)


def test_mining_precision_and_chance():
    mined = torch.tensor([[True, True, False, False], [False, False, True, False]])
    query_label, queue_label = _ids(0, 1), _ids(0, 1, 1, NO_ID)
    assert float(mining_precision(mined, query_label, queue_label)) == pytest.approx(2 / 3)
    assert math.isnan(float(mining_precision(torch.zeros_like(mined), query_label, queue_label)))
    exclude = torch.tensor([[False, False, False, False], [True, False, False, False]])
    # row 0: admissible {0,1,2} (3 has no label), same class {0}; row 1: admissible {1,2}, same {1,2}
    assert float(chance_precision(query_label, queue_label, exclude)) == pytest.approx(3 / 5)


def test_cross_view_nce_warm_up_then_mining():
    tau, dim = 0.07, 8
    queue = Queue(8, dim, cross_view=True)
    q, k, s = _unit(4, dim, seed=20).requires_grad_(), _unit(4, dim, seed=21), _unit(4, dim, seed=22)
    video, group, label = _ids(0, 1, 2, 3), _ids(0, 0, 1, 2), _ids(0, 0, 1, 1)
    kwargs = dict(tau=tau, topk=2, drop=torch.tensor(False))
    loss, stats = cross_view_nce(q, k, s, queue, video, group, label, **kwargs)
    # warm-up on an empty queue: no group matches, nothing mined -> plain InfoNCE on the random queue
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.keys.T], dim=1) / tau
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
    assert math.isnan(float(stats["mining_precision"])) and float(stats["positives"]) == 1.0
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # fill the queue with the sampler's own view of two batches: mining now finds same-class clips
    queue.enqueue(_unit(4, dim, seed=23), video + 10, group + 10, sampler=s, label=label)
    queue.enqueue(_unit(4, dim, seed=24), video + 20, group + 20, sampler=s, label=label)
    loss, stats = cross_view_nce(q.detach(), k, s, queue, video, group, label, **kwargs)
    assert float(stats["positives"]) == 3.0  # own key + top-2, no shared groups
    assert float(stats["mining_precision"]) == 1.0  # each query's top-2 are its own sampler view, queued twice
    assert float(stats["mining_chance"]) == pytest.approx(0.5)  # half of the queue shares each class


def test_mining_and_its_loss_stay_fp32_under_autocast():
    """Under bf16 autocast the sampler similarities were bf16 (ties at the top-K boundary: another
    set mined than in fp32 from the same embeddings); now the fp32 results, bitwise."""
    dim, size = 128, 64
    queue = Queue(size, dim, cross_view=True)
    video, group, label = torch.arange(8), torch.arange(8), torch.arange(8) % 3
    for i in range(size // 8):
        queue.enqueue(_unit(8, dim, seed=40 + i), video + 10 * (i + 1), group + 10 * (i + 1),
                      sampler=_unit(8, dim, seed=60 + i), label=label)
    q, k, s = _unit(8, dim, seed=30), _unit(8, dim, seed=31), _unit(8, dim, seed=32)
    exclude = torch.zeros(8, size, dtype=torch.bool)

    def run():
        loss, stats = cross_view_nce(q, k, s, queue, video, group, label, tau=0.07, topk=5, drop=torch.tensor(False))
        return mine_topk(s, queue.sampler, exclude, 5), loss, stats["top1"]

    expected = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected))
