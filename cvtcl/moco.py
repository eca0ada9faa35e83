"""Momentum contrast machinery: key encoder, key queue, shuffle-BN (paper §2.1, after MoCo).

Everything here changes state only through explicit calls the trainer makes once per step, in
this order (see cvtcl/engine.py):

    model.momentum_update(m)                  # key encoder <- EMA of the query encoder
    keys = model.encode_keys(x_k, perm)       # shuffle-BN (a Permutation drawn before the step), no gradient
    ... losses against model.queue.keys ...
    model.queue.enqueue(keys, video_index, group)   # all-gathered across ranks

Batch-norm leakage (MoCo §3.3): a query and its positive key normalised with statistics of the
same sub-batch can find each other through those statistics instead of through content. The key
encoder therefore sees the batch in a random order split differently from the query encoder:
across ranks (shuffle the global batch with all_to_all, encode, all-gather the embeddings,
un-shuffle), or on one process by a shuffled split into `bn_groups` >= 2 BN groups.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cvtcl import distributed
from cvtcl.models import Encoder, repeat_affine_, repeat_index, running_statistics, split_batch_norm, split_batch_norm_


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """The queue is overwritten one global batch at a time; a remainder would split a batch."""
    if queue_size % global_batch:
        nearest = max(1, round(queue_size / global_batch)) * global_batch
        raise ValueError(
            f"loss.queue_size={queue_size} is not divisible by the global batch {global_batch} "
            f"(data.batch_size x world size): set loss.queue_size={nearest} or change data.batch_size"
        )


class Queue(nn.Module):
    """FIFO of the last K global keys with their video index and source-group id.

    Buffers (all saved in checkpoints): keys [K, D] (unit norm, random at start as in MoCo),
    video_index [K] and group [K] (-1 = never written), ptr [1] (next slot), count [1] (entries
    written so far, capped at K; stage 2 mines positives only once the queue is full).
    With `cross_view` (stage 2, cvtcl/mining.py) each entry also keeps sampler [K, D], the frozen
    other-modality embedding of the same clip, and label [K], read only by the mining-precision
    metric.

    `enqueue` reads nothing on the host: ptr and count are used and advanced on the device
    (index_copy_ at (ptr + arange(n)) % K), so a step never waits for the GPU here. `is_full`
    answers from a host mirror of count, advanced by every enqueue and re-read from the buffer
    once after a checkpoint is loaded.
    """

    def __init__(self, size: int, dim: int, cross_view: bool = False):
        super().__init__()
        self.size = size
        self.cross_view = cross_view
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("video_index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("group", torch.full((size,), -1, dtype=torch.long))
        if cross_view:
            self.register_buffer("sampler", nn.functional.normalize(torch.randn(size, dim), dim=1))
            self.register_buffer("label", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))
        self._count_on_host: int | None = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count_on_host = None  # read once from the loaded buffer when first needed

    @property
    def is_full(self) -> bool:
        if self._count_on_host is None:
            self._count_on_host = int(self.count)  # one read after a checkpoint load, not per step
        return self._count_on_host >= self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, video_index: torch.Tensor, group: torch.Tensor,
                sampler: torch.Tensor | None = None, label: torch.Tensor | None = None) -> None:
        """Gather keys [B, D], video_index [B], group [B] (and, for a cross-view queue, sampler
        [B, D] and label [B]) from every rank and write them at ptr."""
        if self.cross_view != (sampler is not None and label is not None):
            raise ValueError("a cross-view queue needs sampler and label with every enqueue, a plain queue neither")
        rows = {"keys": keys.detach().float(), "video_index": video_index, "group": group}
        if self.cross_view:
            rows |= {"sampler": sampler.detach().float(), "label": label}
        n = keys.shape[0] * distributed.world_size()
        check_queue_size(self.size, n)
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # [n], contiguous: n divides K
        for name, value in rows.items():
            buffer = getattr(self, name)
            buffer.index_copy_(0, slots, distributed.all_gather_cat(value.to(buffer.device, non_blocking=True)))
        self.ptr.add_(n).remainder_(self.size)
        self.count.add_(n).clamp_(max=self.size)
        self.counted(n)

    def counted(self, n: int) -> None:
        """Advance the host mirror of count by n entries (enqueue does; so does a replayed CUDA graph
        of the step, cvtcl.graphed, whose enqueue ran in Python only once, at capture)."""
        if self._count_on_host is not None:
            self._count_on_host = min(self._count_on_host + n, self.size)


@dataclass(frozen=True)
class ShufflePlan:
    """Who encodes what in a cross-rank shuffle of a global batch of world x n samples.

    Global sample g = rank * n + i. A random permutation `perm` of the N = world x n samples is
    cut into world slices of n: rank r encodes samples perm[r*n : (r+1)*n] as one BN batch.
    """

    send_order: torch.Tensor  # [n] this rank's local rows, ordered by the rank that encodes them
    send_counts: list[int]  # [world] rows this rank sends to each rank
    recv_counts: list[int]  # [world] rows this rank receives from each rank
    gathered_ids: torch.Tensor  # [N] global id of each row of the all-gathered encoder outputs


def shuffle_plan(world: int, n: int, rank: int, perm: torch.Tensor) -> ShufflePlan:
    """The plan of the host permutation `perm` [world * n] (the same on every rank)."""
    encoder_of = torch.empty_like(perm)
    encoder_of[perm] = torch.arange(world * n) // n  # encoder_of[g]: the rank that encodes sample g
    mine = encoder_of[rank * n : (rank + 1) * n]
    received = encoder_of.view(world, n) == rank  # [source rank, local row] -> sent to this rank?
    # all_to_all delivers rows grouped by source rank, each group in the source's row order, i.e.
    # rank r ends up with sorted(perm[r*n:(r+1)*n]); the gathered outputs follow that order.
    gathered = torch.cat([torch.sort(perm[r * n : (r + 1) * n]).values for r in range(world)])
    return ShufflePlan(
        send_order=torch.argsort(mine, stable=True),
        send_counts=torch.bincount(mine, minlength=world).tolist(),
        recv_counts=received.sum(dim=1).tolist(),
        gathered_ids=gathered,
    )


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a non-blocking copy, from pinned
    memory on CUDA (pinning needs CUDA; a pageable source would make the copy wait)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class Permutation:
    """One shuffle-BN permutation of N global samples, drawn on the host before the step.

    host: [N] CPU, what the cross-rank plan reads its counts from. On one process `order` [N]
    (device) gathers the shuffled batch and `inverse` [N] (device) restores the input order of
    the encoder outputs. `interleaved`: BN group g's i-th sample (perm[g*n + i]) sits at row
    i*groups + g, so a split BatchNorm sees the groups as a [n, groups*C, ...] view and the key
    encoder runs once (cvtcl.models.SplitBatchNorm3d); otherwise the shuffled rows are contiguous
    and are encoded one group per call (a batch that does not split evenly, or run.legacy_step).
    """

    host: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    interleaved: bool

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, device: torch.device, groups: int = 0,
             legacy: bool = False) -> Permutation:
        """randperm(n) from `generator`, interleaved for `groups` split-BN groups when n divides
        (groups=0: contiguous). `legacy`: the old step's blocking copy and on-device inverse."""
        perm = torch.randperm(n, generator=generator)
        if legacy:
            order = perm.to(device)
            return cls(perm, order, torch.argsort(order), False)
        interleave = groups > 0 and n % groups == 0
        order = perm.view(groups, -1).T.flatten() if interleave else perm
        return cls(perm, to_device_async(order, device), to_device_async(torch.argsort(order), device), interleave)


@torch.no_grad()
def shuffled_encode(encoder: nn.Module, x: torch.Tensor, perm: Permutation, bn_groups: int = 2) -> torch.Tensor:
    """Encode x: [N, ...] -> [N, D] with shuffle-BN; rows come back in the input order.

    `perm` comes from the step's CPU generator, seeded identically on every rank: each rank then
    holds the same permutation, so no broadcast is needed, and a resumed run draws the same
    permutations. Across ranks the inputs travel by all_to_all: each rank sends and receives about
    one batch (MoCo all-gathers the inputs instead, world x the batch's bytes into every rank);
    only the small [N, D] outputs are all-gathered to un-shuffle. On one process the shuffled
    batch is split into `bn_groups` BN groups: one encoder call with split BatchNorms when
    `perm.interleaved` (the training step draws it so on a GPU: fewer launches), else one call
    per group (on the CPU, where that is faster).
    """
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        n = x.shape[0]
        plan = shuffle_plan(world, n, rank, perm.host)
        received = distributed.all_to_all(x[to_device_async(plan.send_order, x.device)], plan.send_counts,
                                          plan.recv_counts)
        z_all = distributed.all_gather_cat(encoder(received))  # [W * n, D], rows = plan.gathered_ids
        z = torch.empty_like(z_all)
        z[to_device_async(plan.gathered_ids, z.device)] = z_all
        return z[rank * n : (rank + 1) * n]
    shuffled = x[perm.order]
    if perm.interleaved:
        with split_batch_norm(encoder, bn_groups):
            z = encoder(shuffled)
    else:
        z = torch.cat([encoder(chunk) for chunk in shuffled.chunk(bn_groups)])
    return z[perm.inverse]


class MomentumContrast(nn.Module):
    """Query encoder (trained), its momentum copy (keys) and the queue of global keys.

    Only `query` receives gradients; wrap `model.query` in DDP, not this module. The state dict
    (query.*, key.*, queue.*) is what checkpoints store.
    """

    def __init__(self, query: Encoder, queue_size: int, bn_groups: int = 2, cross_view: bool = False):
        super().__init__()
        if bn_groups < 2:
            raise ValueError("loss.bn_groups must be >= 2: one BN group would leak the positive through BN statistics")
        self.query = query
        self.key = split_batch_norm_(copy.deepcopy(query))  # one call encodes every BN group
        self.key.requires_grad_(False)
        self.queue = Queue(queue_size, query.embed_dim, cross_view)
        self.bn_groups = bn_groups
        self.register_buffer("repeat_index", repeat_index(self.key, bn_groups), persistent=False)
        self.register_buffer("repeated_affine", torch.empty(len(self.repeat_index)), persistent=False)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """key <- momentum * key + (1 - momentum) * query, parameters only (BN statistics are the
        key encoder's own, as in MoCo). Call once per step, before the keys are computed."""
        keys, queries = list(self.key.parameters()), [p.detach() for p in self.query.parameters()]
        torch._foreach_mul_(keys, momentum)  # a few fused launches on the GPU instead of two per tensor
        torch._foreach_add_(keys, queries, alpha=1.0 - momentum)
        # The key encoder only ever normalises with batch statistics (its split BatchNorms keep no
        # running statistics); it carries the query's, so eval-mode use of it (load_encoder
        # which="key") normalises with statistics of the same data.
        torch._foreach_copy_(running_statistics(self.key), running_statistics(self.query))
        # the split BatchNorms' affine, two launches, into the same memory every step
        repeat_affine_(self.key, self.repeat_index, self.bn_groups, self.repeated_affine)

    @torch.no_grad()
    def copy_query_to_key(self) -> None:
        """Start the key encoder equal to the query (run start, stage-2 sub-stage start)."""
        self.key.load_state_dict(self.query.state_dict())

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, perm: Permutation) -> torch.Tensor:
        """x: [N, C, T, H, W] key copies (clips or folded segments) -> keys [N, D], no gradient."""
        return shuffled_encode(self.key, x, perm, self.bn_groups)
