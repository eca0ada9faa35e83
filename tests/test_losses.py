"""Stage-1 losses equal naive per-sample loops (values and gradients); accuracies count correctly."""

import math

import pytest
import torch
import torch.nn.functional as F

from cvtcl import losses

TAU = 0.07


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def _nll(logits, target):
    """-log softmax(logits)[target] for one 1-D logit vector, written out."""
    return -(logits[target] - torch.log(sum(torch.exp(v) for v in logits)))


def naive_info_nce(q, k, queue):
    rows = []
    for b in range(len(q)):
        logits = torch.stack([q[b] @ k[b]] + [q[b] @ queue[j] for j in range(len(queue))]) / TAU
        rows.append(_nll(logits, 0))
    return sum(rows) / len(rows)


def naive_local(zq, zk, queue):
    terms = []
    for b in range(zq.shape[0]):
        for i in range(zq.shape[1]):
            for m in range(zk.shape[1]):  # every key segment is a positive with its own softmax
                logits = torch.stack([zq[b, i] @ zk[b, m]] + [zq[b, i] @ queue[j] for j in range(len(queue))]) / TAU
                terms.append(_nll(logits, 0))
    return sum(terms) / len(terms)


def naive_temporal(zq, zk):
    terms = []
    for b in range(zq.shape[0]):
        for i in range(zq.shape[1]):
            logits = torch.stack([zq[b, i] @ zk[b, m] for m in range(zk.shape[1])]) / TAU
            terms.append(_nll(logits, i))
    return sum(terms) / len(terms)


def _check(fast, naive, inputs):
    fast_value = fast(*inputs)
    fast_grads = torch.autograd.grad(fast_value, inputs)
    naive_value = naive(*inputs)
    naive_grads = torch.autograd.grad(naive_value, inputs)
    assert fast_value.item() == pytest.approx(naive_value.item(), rel=1e-5)
    for a, b in zip(fast_grads, naive_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_info_nce_matches_loop():
    q, k, queue = _unit(3, 8, seed=0), _unit(3, 8, seed=1), _unit(5, 8, seed=2)
    _check(lambda *x: losses.info_nce(*x, TAU), naive_info_nce, (q, k, queue))


@pytest.mark.parametrize("num_queries", [1, 4])  # local_queries = first | all
def test_local_loss_matches_loop(num_queries):
    zq, zk, queue = _unit(2, num_queries, 8, seed=3), _unit(2, 4, 8, seed=4), _unit(6, 8, seed=5)
    _check(lambda *x: losses.local_loss(*x, TAU), naive_local, (zq, zk, queue))


@pytest.mark.parametrize("num_queries", [1, 4])
def test_local_temporal_loss_matches_loop(num_queries):
    zq, zk = _unit(3, num_queries, 8, seed=6), _unit(3, 4, 8, seed=7)
    _check(lambda *x: losses.local_temporal_loss(*x, TAU), naive_temporal, (zq, zk))


def test_ltcl_is_sum_of_local_and_temporal():
    zq, zk, queue = _unit(2, 1, 8, seed=8), _unit(2, 4, 8, seed=9), _unit(4, 8, seed=10)
    _check(lambda *x: losses.ltcl_loss(*x, TAU), lambda a, b, c: naive_local(a, b, c) + naive_temporal(a, b),
           (zq, zk, queue))


def test_losses_compute_in_fp32_from_half_inputs():
    q, k, queue = (_unit(4, 8, seed=s).detach().bfloat16() for s in (11, 12, 13))
    assert losses.info_nce(q, k, queue, TAU).dtype == torch.float32
    assert losses.local_loss(q[:, None], k[:, None], queue, TAU).dtype == torch.float32


def test_perfect_positive_gives_low_loss_and_full_accuracy():
    k = _unit(4, 16, seed=14).detach()
    queue = -k[:2]  # negatives pointing away
    assert losses.info_nce(k, k, queue, TAU).item() < 1e-3
    assert losses.top1(losses.contrastive_logits(k, k, queue, TAU)).item() == 1.0
    segments = torch.eye(4)[None].expand(2, 4, 4)  # orthogonal segments: each finds itself
    assert losses.temporal_top1(segments, segments).item() == 1.0
    assert losses.local_temporal_loss(segments, segments, TAU).item() < 1e-3
    # Uniform logits: chance level log(M).
    same = torch.ones(2, 4, 4) / 2
    assert losses.local_temporal_loss(same, same, TAU).item() == pytest.approx(math.log(4), rel=1e-6)


def test_query_segments_and_bad_choice():
    segments = torch.arange(2 * 4).view(2, 4, 1)
    assert losses.query_segments(segments, "first").tolist() == [[[0]], [[4]]]
    assert losses.query_segments(segments, "all").shape == (2, 4, 1)
    with pytest.raises(ValueError, match="first, all|'first', 'all'"):
        losses.query_segments(segments, "middle")


def test_losses_stay_fp32_under_autocast():
    """autocast ran the losses' matmuls in bf16 even on fp32 inputs (a bf16 logit near 1/0.07 has
    steps of 0.06: a local loss of 1e-5 came out 0): under it they give the fp32 values, bitwise."""
    q, k, queue = (_unit(16, 128, seed=s).detach().float() for s in (20, 21, 22))
    zq, zk = (_unit(16, m, 128, seed=s).detach().float() for m, s in ((1, 23), (4, 24)))
    for name, args in {"contrastive_logits": (q, k, queue, TAU), "info_nce": (q, k, queue, TAU),
                       "local_loss": (zq, zk, queue, TAU), "local_temporal_loss": (zq, zk, TAU),
                       "ltcl_loss": (zq, zk, queue, TAU), "temporal_logits": (zq, zk, TAU)}.items():
        expected = getattr(losses, name)(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = getattr(losses, name)(*args)
        assert got.dtype == torch.float32 and torch.equal(got, expected), name
