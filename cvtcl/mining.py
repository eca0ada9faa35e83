"""Stage-2 positive mining for cross-view co-training (paper §2.2, §2.4; eqs. 2–5).

The trained modality m contrasts its query z against the columns [z⁺ | queue] (own key, then
the K queued keys of m). A frozen sampler of the other modality o decides which queue columns
are positives besides z⁺: entries of the same source group, and the top-K entries by the
sampler's similarity s · queue_o. This module owns

- `source_mask`, `mine_topk`, `positive_mask`: the positive set of eqs. 3 and 5;
- `multi_positive_nce`: L_RF / L_FR of eqs. 2 and 4;
- `drop_self_positive`: CoCLR's self-positive dropping (p = 0.9 per step);
- `mining_precision`: the fraction of mined positives that share the query's class.

Everything here is a pure fp32 function of embeddings and ids. The queue is `cvtcl.moco.Queue`
built with `cross_view=True`: per entry the key of m, the sampler embedding of o, the video
index, the source-group id and the class label (read only by `mining_precision`, never by a
loss); it changes only through its `enqueue`, called by the trainer after the update.
Shapes use the project's axis letters: B queries, K queue entries, D embedding dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvtcl.losses import fp32

NO_ID = -1  # video / group / label of a queue slot that was never filled (cvtcl.moco.Queue)


def source_mask(query_video: Tensor, query_group: Tensor, queue_video: Tensor, queue_group: Tensor) -> Tensor:
    """Queue entries from the query's own source: same video, or same source group.

    query_video, query_group: [B]; queue_video, queue_group: [K] -> Bool [B, K].
    Group ids < 0 mean "unknown" and match nothing (empty queue slots carry NO_ID). Earlier
    clips of the query's own video are positives too: they belong to its group (CoCLR's rule,
    which matters only when a dataset has no group ids).
    """
    same_video = (query_video[:, None] == queue_video[None, :]) & (queue_video[None, :] >= 0)
    same_group = (query_group[:, None] == queue_group[None, :]) & (queue_group[None, :] >= 0)
    return same_video | same_group


@fp32
def mine_topk(sampler_query: Tensor, queue_sampler: Tensor, exclude: Tensor, topk: int) -> Tensor:
    """The top-K queue entries by sampler similarity s · queue_o, never an excluded one (eqs. 3/5).

    sampler_query: [B, D] sampler embedding s of each query's clip (modality o);
    queue_sampler: [K, D]; exclude: Bool [B, K] (own video and same group) -> Bool [B, K].
    A row with fewer than `topk` admissible entries gets all of them.
    """
    if topk <= 0:
        return torch.zeros_like(exclude)
    sim = sampler_query.float() @ queue_sampler.float().T  # [B, K]
    sim = sim.masked_fill(exclude, float("-inf"))
    k = min(topk, sim.shape[1])
    _, index = sim.topk(k, dim=1)  # [B, k]
    admissible = ~torch.gather(exclude, 1, index)  # an excluded column can only be picked when too few remain
    mined = torch.zeros_like(exclude)
    return mined.scatter(1, index, admissible)


class Positives(NamedTuple):
    """mask: Bool [B, 1 + K] over [own key | queue]; mined: Bool [B, K], the top-K part alone."""

    mask: Tensor
    mined: Tensor


def positive_mask(
    sampler_query: Tensor,
    queue_sampler: Tensor,
    query_video: Tensor,
    query_group: Tensor,
    queue_video: Tensor,
    queue_group: Tensor,
    *,
    topk: int,
    queue_full: bool,
) -> Positives:
    """The positive set P of eqs. 3/5 over the columns [z⁺ | queue].

    sampler_query: [B, D]; queue_sampler: [K, D]; query_video, query_group: [B];
    queue_video, queue_group: [K] -> Positives(mask Bool [B, 1 + K], mined Bool [B, K]).
    Column 0 (own key) is always positive; queue columns are positive when they come from the
    query's source (`source_mask`) or are among its top-K by sampler similarity. Mining waits for
    a full queue: before that the queue still holds random initial vectors whose similarities
    mean nothing, and the warm-up trains on own key and group only.
    """
    source = source_mask(query_video, query_group, queue_video, queue_group)
    if queue_full:
        mined = mine_topk(sampler_query, queue_sampler, source, topk)
    else:
        mined = torch.zeros_like(source)
    own = torch.ones_like(source[:, :1])
    return Positives(torch.cat([own, source | mined], dim=1), mined)


@fp32
def multi_positive_nce(logits: Tensor, mask: Tensor) -> Tensor:
    """L_RF (eq. 2) / L_FR (eq. 4): mean over rows of −log(Σ_{p∈P} exp ℓ_p / Σ_all exp ℓ).

    logits: [B, 1 + K] = [z·z⁺, z·queue] / τ; mask: Bool [B, 1 + K], at least one True per row
    -> scalar. Computed in fp32 with two log-sum-exps (stable for τ = 0.07). With only column 0
    positive it is exactly InfoNCE (eq. 1).
    """
    # A row without positives gives +inf (log of an empty sum): the trainer's non-finite check
    # reports it at the next log step; checking here would make every step wait for the GPU.
    logits = logits.float()
    positive = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


def self_positive_drop(p: float, generator: torch.Generator) -> bool:
    """CoCLR's per-step draw: drop the own key from the numerator this step, with probability p.
    `generator` is the step's CPU generator (`cvtcl.engine.step_generator`), so every rank and a
    resumed run make the same choice; the trainer draws it before the step (engine.StepDraws)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"self-positive drop probability must be in [0, 1], got {p}")
    return float(torch.rand((), generator=generator)) < p


def drop_self_positive(mask: Tensor, drop: Tensor) -> Tensor:
    """When `drop` (a bool scalar tensor), drop column 0 from rows with other positives.

    mask: Bool [B, 1 + K] -> Bool [B, 1 + K] (a new tensor). After stage 1 the own key is
    already the easiest positive, so keeping it lets co-training stall (CoCLR's published fix).
    Only the numerator changes: `multi_positive_nce` still sums every column in the denominator.
    `drop` stays on the device: no host read.
    """
    out = mask.clone()
    out[:, 0] &= ~(drop & mask[:, 1:].any(dim=1))
    return out


def mining_precision(mined: Tensor, query_label: Tensor, queue_label: Tensor) -> Tensor:
    """Fraction of mined positives whose class equals the query's (labels used only here).

    mined: Bool [B, K] (top-K part only, excluding own video and group); query_label: [B];
    queue_label: [K] -> scalar fp32, NaN when nothing was mined (warm-up, top-K = 0).
    """
    same_class = query_label[:, None] == queue_label[None, :]
    total = mined.sum().float()
    hits = (mined & same_class).sum().float()
    # no host read of `total`: this runs inside the training step
    return torch.where(total > 0, hits / total.clamp(min=1), torch.full_like(total, float("nan")))


def chance_precision(query_label: Tensor, queue_label: Tensor, exclude: Tensor) -> Tensor:
    """The precision a random pick among admissible queue entries would have (the baseline).

    query_label: [B]; queue_label: [K]; exclude: Bool [B, K] -> scalar fp32.
    """
    admissible = ~exclude & (queue_label[None, :] >= 0)
    same_class = (query_label[:, None] == queue_label[None, :]) & admissible
    return same_class.sum().float() / admissible.sum().clamp(min=1).float()


@fp32
def cross_view_nce(
    q: Tensor,
    k: Tensor,
    s: Tensor,
    queue: nn.Module,
    video: Tensor,
    group: Tensor,
    label: Tensor,
    *,
    tau: float,
    topk: int,
    drop: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_RF / L_FR (eqs. 2–5) for one step, against the queue *before* this batch is enqueued.

    q: [B, D] queries of m (with grad); k: [B, D] own keys of m; s: [B, D] sampler embeddings of
    the key copy in modality o; queue: a cross-view `cvtcl.moco.Queue`; video, group, label: [B] -> (scalar loss, detached stats):
    `mining_precision` and `mining_chance` (same-class fraction of the mined positives and of a
    random admissible pick), `positives` (mean positives per row before dropping) and `top1`
    (the highest logit is a positive).
    """
    q, k = q.float(), k.float()
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.keys.T], dim=1) / tau  # [B, 1 + K]
    pos = positive_mask(s, queue.sampler, video, group, queue.video_index, queue.group, topk=topk, queue_full=queue.is_full)
    loss = multi_positive_nce(logits, drop_self_positive(pos.mask, drop))
    with torch.no_grad():
        exclude = pos.mask[:, 1:] & ~pos.mined  # own video and group, the columns mining may not pick
        stats = {
            "mining_precision": mining_precision(pos.mined, label, queue.label),
            "mining_chance": chance_precision(label, queue.label, exclude),
            "positives": pos.mask.sum(dim=1).float().mean(),
            "top1": torch.gather(pos.mask, 1, logits.argmax(dim=1, keepdim=True)).float().mean(),
        }
    return loss, stats
