"""Stage-1 contrastive losses of CVTCL (paper §2.1 eq. 1, §2.3 eqs. 6-8) and their accuracies.

Pure functions of unit-norm embeddings and the queue: no state, no modules. Each runs with
autocast off (`fp32`) on inputs cast to fp32, so the losses are computed in fp32 whatever precision
the encoders ran in: logits of 0.07-temperature softmaxes over 2048 negatives are outside what
bf16/fp16 resolve (a bf16 logit near 1/0.07 has steps of 0.06), and autocast would run their
matmuls in bf16/fp16 even on fp32 inputs.

Shapes (docs/algorithm.md notation): B batch, M local segments, Mq query segments (1 for
local_queries="first", M for "all"), D embedding dim, K queue length.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

LOCAL_QUERIES = ("first", "all")
F32 = TypeVar("F32", bound=Callable)


def fp32(loss: F32) -> F32:
    """Run `loss` with autocast off on its tensors' device (cpu or cuda: the meta device that
    cvtcl.step_audit counts on has no autocast), so its matmuls and reductions stay in fp32."""

    @functools.wraps(loss)
    def in_fp32(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return loss(*args, **kwargs)
        return loss(*args, **kwargs)

    return in_fp32  # type: ignore[return-value]



@fp32
def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits of eq. 1: column 0 is the positive z.z+, columns 1..K the queue.

    q: [B, D] queries, k: [B, D] positive keys, queue: [K, D] -> [B, 1 + K], divided by tau.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    positive = torch.einsum("bd,bd->b", q, k).unsqueeze(1)  # [B, 1]
    negatives = torch.einsum("bd,kd->bk", q, queue)  # [B, K]
    return torch.cat([positive, negatives], dim=1) / tau


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Global instance loss L_InfoNCE (eq. 1): CE([z.z+, z.queue] / tau, target 0), batch mean.

    q: [B, D], k: [B, D], queue: [K, D] -> scalar.
    """
    return positive_first_nce(contrastive_logits(q, k, queue, tau))


@fp32
def positive_first_nce(logits: torch.Tensor) -> torch.Tensor:
    """CE of [N, C] logits whose column 0 is the positive (eq. 1 given `contrastive_logits`)."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@fp32
def local_loss(q_segments: torch.Tensor, k_segments: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """L_local (eq. 6): every key segment is a positive with its own softmax against the queue.

    q_segments: [B, Mq, D] query-encoder embeddings of segments of the query copy;
    k_segments: [B, M, D] key-encoder embeddings of all M segments of the key copy;
    queue: [K, D] global keys -> scalar
      = mean over b, query segments i, positives m of CE([z_i.p_m, z_i.queue] / tau, 0).
    The K negatives are shared by the M softmaxes of one query, so their log-sum-exp is computed
    once: CE = -l_pos + log(exp(l_pos) + sum exp(l_neg)) = -l_pos + logaddexp(l_pos, lse(l_neg)).
    """
    q, k, queue = q_segments.float(), k_segments.float(), queue.float()
    positives = temporal_logits(q, k, tau)  # [B, Mq, M]
    negatives = torch.einsum("bid,kd->bik", q, queue) / tau  # [B, Mq, K]
    denominator = torch.logaddexp(positives, torch.logsumexp(negatives, dim=2, keepdim=True))
    return (denominator - positives).mean()


@fp32
def temporal_logits(q_segments: torch.Tensor, k_segments: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits of eq. 7: query segment i against the M segments of the same video's key copy.

    q_segments: [B, Mq, D], k_segments: [B, M, D] -> [B, Mq, M]; the target of row i is i.
    """
    return torch.einsum("bid,bmd->bim", q_segments.float(), k_segments.float()) / tau


def _segment_targets(q_segments: torch.Tensor) -> torch.Tensor:
    """Query segment i's positive is key segment i: targets [B, Mq] = 0..Mq-1 per row."""
    b, mq = q_segments.shape[:2]
    return torch.arange(mq, device=q_segments.device).expand(b, mq)


@fp32
def local_temporal_loss(q_segments: torch.Tensor, k_segments: torch.Tensor, tau: float) -> torch.Tensor:
    """L_LT (eq. 7): one softmax over the M key segments; positive = the same segment.

    q_segments: [B, Mq, D], k_segments: [B, M, D] -> scalar (mean over b and query segments).
    The negatives are the other segments of the same video, so a non-motion cue that tells
    segments apart (padding, boundary artefacts) solves it: a value near 0 early is a bug.
    """
    logits = temporal_logits(q_segments, k_segments, tau)  # [B, Mq, M]
    return F.cross_entropy(logits.flatten(0, 1), _segment_targets(q_segments).flatten())


def ltcl_loss(q_segments: torch.Tensor, k_segments: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """L_LTCL = L_local + L_LT (eq. 8). Shapes as in `local_loss`."""
    return local_loss(q_segments, k_segments, queue, tau) + local_temporal_loss(q_segments, k_segments, tau)


def query_segments(segments: torch.Tensor, local_queries: str) -> torch.Tensor:
    """Which segments of the query copy act as local queries: [B, M, ...] -> [B, Mq, ...].

    "first" is the paper's z_1 (Mq = 1); "all" (beyond the paper) uses every segment in turn.
    """
    if local_queries == "first":
        return segments[:, :1]
    if local_queries == "all":
        return segments
    raise ValueError(f"local_queries={local_queries!r}: choose one of {LOCAL_QUERIES}")


@torch.no_grad()
def top1(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive top-1 accuracy: the fraction of rows whose largest logit is the target.

    logits: [N, C] with targets [N] (default: column 0, the positive of eq. 1) -> scalar in [0, 1].
    """
    if targets is None:
        targets = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return (logits.argmax(dim=1) == targets).float().mean()


@torch.no_grad()
def temporal_top1(q_segments: torch.Tensor, k_segments: torch.Tensor) -> torch.Tensor:
    """Top-1 of eq. 7: query segment i is closest to key segment i. Shapes as in `local_temporal_loss`."""
    logits = temporal_logits(q_segments, k_segments, 1.0)
    return top1(logits.flatten(0, 1), _segment_targets(q_segments).flatten())
