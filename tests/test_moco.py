"""Momentum encoder, queue and shuffle-BN: single-process emulation, the cross-rank plan, and two ranks under torchrun."""

import json

import pytest
import torch

from cvtcl.models import Encoder, running_statistics
from cvtcl.moco import MomentumContrast, Permutation, Queue, check_queue_size, shuffle_plan, shuffled_encode
from trainer_fakes import RowStats, torchrun_check


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
    model.query(torch.randn(2, 3, 4, 16, 16))  # train mode: the query's BN running statistics move
    model.momentum_update(0.9)
    for before, p_k, p_q in zip(key_before, model.key.parameters(), model.query.parameters(), strict=True):
        torch.testing.assert_close(p_k, 0.9 * before + 0.1 * p_q)
    # the key carries the query's running statistics (for eval-mode use, load_encoder which="key")
    stats = running_statistics(model.query)
    assert stats and not all(torch.equal(s, torch.zeros_like(s)) for s in stats[0::2])
    assert all(torch.equal(k, q) for k, q in zip(running_statistics(model.key), stats, strict=True))


def _perm(n, seed, groups=0):
    """A contiguous permutation (groups=0: one encoder call per BN group), or interleaved for split BN."""
    return Permutation.draw(n, torch.Generator().manual_seed(seed), torch.device("cpu"), groups)


def test_shuffle_bn_emulation_splits_into_random_groups_and_restores_order():
    x = (2.0 ** torch.arange(8.0)).view(8, 1)  # every subset has its own mean
    out = shuffled_encode(RowStats(), x, _perm(8, 0), bn_groups=2)
    assert out[:, 0].tolist() == x[:, 0].tolist()  # rows come back in input order
    group_means = sorted(set(out[:, 1].tolist()))
    assert len(group_means) == 2  # two BN groups ...
    assert group_means != [3.75, 60.0]  # ... drawn at random, not the contiguous halves (seed 0)
    again = shuffled_encode(RowStats(), x, _perm(8, 0), bn_groups=2)
    torch.testing.assert_close(out, again)  # a pure function of the generator's seed


def test_shuffle_is_invisible_without_batch_statistics():
    torch.manual_seed(0)
    encoder = Encoder("rgb", "tiny").eval()
    x = torch.randn(6, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(shuffled_encode(encoder, x, _perm(6, 1), 3), encoder(x),
                                   rtol=1e-4, atol=1e-5)


def test_one_bn_group_is_refused():
    with pytest.raises(ValueError, match="bn_groups"):
        MomentumContrast(Encoder("rgb", "tiny"), queue_size=4, bn_groups=1)


def _simulate_exchange(world, n, seed):
    """Run shuffle_plan for every rank and move rows as all_to_all would: what each rank encodes."""
    perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(seed))
    plans = [shuffle_plan(world, n, r, perm) for r in range(world)]
    sent = [[] for _ in range(world)]  # sent[dest] = rows, grouped by source rank
    for source, plan in enumerate(plans):
        ids = (source * n + plan.send_order).tolist()
        start = 0
        for dest, count in enumerate(plan.send_counts):
            sent[dest] += ids[start : start + count]
            start += count
    return plans, sent


def test_cross_rank_shuffle_plan_moves_every_sample_once():
    world, n = 3, 4
    plans, encoded = _simulate_exchange(world, n, seed=0)
    perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(0))
    for rank in range(world):
        assert sorted(encoded[rank]) == sorted(perm[rank * n : (rank + 1) * n].tolist())  # its BN group
        assert len(encoded[rank]) == n == sum(plans[rank].recv_counts)
        assert plans[rank].recv_counts == [sum(1 for g in encoded[rank] if g // n == s) for s in range(world)]
    gathered = [g for rank in range(world) for g in encoded[rank]]
    assert plans[0].gathered_ids.tolist() == gathered  # the un-shuffle index matches the delivery order
    assert sorted(gathered) == list(range(world * n))
    assert any(sorted(encoded[r]) != list(range(r * n, (r + 1) * n)) for r in range(world))  # really shuffled


@pytest.mark.multiprocess
def test_shuffle_bn_across_two_ranks(tmp_path):
    """torchrun, gloo: each rank gets its own rows back, encoded in the BN group the plan says."""
    done = torchrun_check("shuffle-check", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    group_of = {int(g): r for r in range(2) for g in perm[r * 4 : (r + 1) * 4]}
    means = {r: perm[r * 4 : (r + 1) * 4].float().mean().item() for r in range(2)}
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["own"] == [rank * 4 + i for i in range(4)]
        assert result["group_mean"] == pytest.approx([means[group_of[rank * 4 + i]] for i in range(4)])


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_call_split_batch_norm_equals_one_call_per_group(channels_last):
    """The key encoder's one call over interleaved BN groups gives the keys that one call per
    group gives (contiguous: bitwise; channels_last_3d takes a per-group path inside each BN)."""
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=16, channels_last_3d=channels_last), queue_size=8)
    x = torch.randn(8, 3, 4, 16, 16)
    calls = []
    model.key.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    one_call = model.encode_keys(x, _perm(8, 3, groups=2))
    per_group = model.encode_keys(x, _perm(8, 3))
    assert calls == [8, 4, 4]
    if channels_last:
        torch.testing.assert_close(one_call, per_group, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(one_call, per_group)
    different_groups = model.encode_keys(x, _perm(8, 4, groups=2))
    assert not torch.allclose(one_call, different_groups)  # the statistics really are per group


def test_batch_norms_keep_no_batch_counter_and_old_checkpoints_load():
    torch.manual_seed(0)
    encoder = Encoder("rgb", "tiny", embed_dim=16)
    assert not any(k.endswith("num_batches_tracked") for k in encoder.state_dict())
    old = {k: v.clone() for k, v in encoder.state_dict().items()}
    old |= {f"backbone.{i}.num_batches_tracked": torch.tensor(7) for i in (1, 4, 7, 10)}  # as saved before
    Encoder("rgb", "tiny", embed_dim=16).load_state_dict(old)  # strict: would raise on an unexpected key
    before = [b.clone() for b in encoder.buffers()]
    encoder.train()(torch.randn(2, 3, 4, 16, 16))
    assert len(before) == len(list(encoder.buffers()))  # running mean/var only, updated; no counter


def test_queue_enqueue_reads_nothing_on_the_host_and_restores_is_full():
    queue = Queue(size=4, dim=2)
    queue.enqueue(torch.ones(2, 2), torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert not queue.is_full
    copy = Queue(size=4, dim=2)
    copy.load_state_dict(queue.state_dict())
    copy.enqueue(torch.ones(2, 2), torch.tensor([3, 4]), torch.tensor([3, 4]))
    assert copy.is_full and copy.video_index.tolist() == [1, 2, 3, 4] and int(copy.ptr) == 0
