"""The training loop shared by both stages (paper §2.1-2.4; after mae's engine_pretrain.py).

One optimizer step is the same for every stage:

    momentum update of the key encoder -> stage step (forward + loss terms, autocast)
    -> non-finite check -> backward (GradScaler in fp16) -> optimizer step -> enqueue keys

Only the stage step differs. It lives in `STEPS[config.stage.kind]`: a function
`(ctx, batch, generator) -> StepOutput` returning the weighted loss, detached terms to log, a
closure that enqueues this step's keys, and whether to update the weights at all. Stage 1 is
`instance_step` below; stage 2 (co-training) registers "cotrain" with its own step function
(sampler forward, mined positives, its own queue, no update until that queue is full) and the
loop, checkpoints and metrics stay as they are. Stage-specific modules (the frozen sampler, a
cross-view queue) belong on `ctx.model` (`add_module`), so checkpoints and resume include them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cvtcl import augment, losses
from cvtcl.config import OptimConfig, TrainConfig
from cvtcl.moco import MomentumContrast


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for optim.amp; None = fp32. auto: bf16 on compute capability >= 8.0, fp16 on
    7.x (tensor cores, no bf16), fp32 below (Pascal runs fp16 at 1/64 rate) and on CPU."""
    if setting == "fp32":
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16 if major == 7 else None
    if device.type != "cuda":
        # fp16 autocast is CUDA-only. bf16 on CPU: torch 2.14's CPU conv3d backward under bf16 autocast
        # returns non-finite weight gradients for most batches (measured: 17 of 20 with one thread).
        raise ValueError(f"optim.amp={setting} needs a CUDA device; use optim.amp=fp32 (or auto) on CPU")
    return torch.bfloat16 if setting == "bf16" else torch.float16


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Multistep schedule: lr x gamma for every milestone epoch reached (paper: 250, 280)."""
    return optim.lr * optim.lr_gamma ** sum(epoch >= m for m in optim.lr_milestones)


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the shuffle-BN permutations of one step: the same on every rank and on a
    resumed run, because it depends only on (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def augment_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for the batch-level augmentation (data.dihedral) of one step on one rank: each
    rank draws its own elements, and a resumed run draws the same ones."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4099 + rank) * 2 + 1)


@dataclass
class Context:
    """What one optimizer step needs. `query` is `model.query`, wrapped in DDP when world > 1."""

    config: TrainConfig
    model: MomentumContrast
    query: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast_dtype: torch.dtype | None
    step: int = 0  # optimizer steps done
    sampler: nn.Module | None = None  # stage 2: frozen encoder of the other modality (cvtcl/cotrain.py)
    rank: int = 0  # this process's rank (seeds its batch-level augmentation)


@dataclass
class StepOutput:
    loss: torch.Tensor  # weighted total, differentiable
    terms: dict[str, torch.Tensor]  # detached scalars to log: every loss term and accuracy ("loss" included)
    enqueue: Callable[[], None]  # writes this step's keys into the stage's queue(s), after the update
    optimize: bool = True  # False = no backward/optimizer step (stage 2 warm-up until the queue is full)


def clip_segments(batch: dict[str, torch.Tensor], modality: str, num_segments: int) -> torch.Tensor:
    """Local segments of both copies: [B, V, M, C, L, H, W].

    segments="spread" loaders deliver them as `<modality>_segments`; for "quarters" segment j is
    frames [jL, (j+1)L) of each (already augmented) clip copy, a view without copying.
    """
    if f"{modality}_segments" in batch:
        return batch[f"{modality}_segments"]
    clips = batch[modality]  # [B, V, C, T, H, W]
    b, v, c, t, h, w = clips.shape
    return clips.view(b, v, c, num_segments, t // num_segments, h, w).transpose(2, 3)


def encode_segments(encoder: Callable[[torch.Tensor], torch.Tensor], segments: torch.Tensor) -> torch.Tensor:
    """[B, M, C, L, H, W] -> [B, M, D]: the M segments folded into the batch axis, ONE encoder call."""
    return encoder(segments.flatten(0, 1)).unflatten(0, segments.shape[:2])


def instance_step(ctx: Context, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
    """Stage 1: L1 = alpha * L_InfoNCE (eq. 1) + beta * L_LTCL (eqs. 6-8), one modality."""
    config, model = ctx.config, ctx.model
    modality, tau = config.stage.modality, config.loss.tau
    clips = batch[modality]  # [B, V=2, C, T, H, W]: copy 0 = query, copy 1 = key
    queue = model.queue.keys  # [K, D]; enqueued only after backward (autograd saved this buffer)

    z = ctx.query(clips[:, 0])  # [B, D]
    keys = model.encode_keys(clips[:, 1], generator)  # [B, D]
    logits = losses.contrastive_logits(z, keys, queue, tau)  # [B, 1 + K], once for the loss and its accuracy
    instance = losses.positive_first_nce(logits)
    terms = {"loss_instance": instance.detach(), "top1_instance": losses.top1(logits.detach())}
    loss = config.loss.instance_weight * instance
    if config.uses_segments:
        ltcl, ltcl_terms = ltcl_step(ctx, batch, generator)
        loss = loss + config.loss.ltcl_weight * ltcl
        terms |= ltcl_terms
    terms["loss"] = loss.detach()
    video_index, group = batch["video_index"], batch["group"]
    return StepOutput(loss, terms, enqueue=lambda: model.queue.enqueue(keys, video_index, group))


def ltcl_step(ctx: Context, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_LTCL = L_local + L_LT (eqs. 6-8) of the trained modality, unweighted, with its logged terms.

    Shared by both stages. Local keys go through the key encoder's shuffle-BN like the global keys
    (shuffle, encode, un-shuffle), so key segment j of row b belongs to video b; the authors'
    stage-2 code un-shuffled keys it had never shuffled (ALGORITHM.md "Known defects").
    """
    config, model = ctx.config, ctx.model
    segments = clip_segments(batch, config.stage.modality, config.data.num_segments)  # [B, V, M, C, L, H, W]
    z_local = encode_segments(ctx.query, losses.query_segments(segments[:, 0], config.loss.local_queries))
    k_local = encode_segments(lambda x: model.encode_keys(x, generator), segments[:, 1])  # [B, M, D]
    local = losses.local_loss(z_local, k_local, model.queue.keys, config.loss.tau)
    temporal = losses.local_temporal_loss(z_local, k_local, config.loss.tau)
    return local + temporal, {
        "loss_local": local.detach(),
        "loss_temporal": temporal.detach(),
        "top1_temporal": losses.temporal_top1(z_local.detach(), k_local),
    }


# Stage kind -> step function. Stage 2 registers "cotrain" here (see the module docstring).
STEPS: dict[str, Callable[[Context, dict[str, torch.Tensor], torch.Generator], StepOutput]] = {
    "instance": instance_step,
}


def train_step(ctx: Context, batch: dict[str, torch.Tensor], epoch: int, epoch_step: int) -> dict[str, float]:
    """One optimizer step on `batch`; returns the logged terms as floats."""
    config = ctx.config
    ctx.model.momentum_update(config.loss.momentum)  # before the keys of this step are computed
    generator = step_generator(config.run.seed, ctx.step)
    if config.data.dihedral:
        batch = dict(batch)  # the caller's dict keeps its tensors
        augment.dihedral_(batch, augment_generator(config.run.seed, ctx.step, ctx.rank))
    with torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype or torch.float32, enabled=ctx.autocast_dtype is not None):
        out = STEPS[config.stage.kind](ctx, batch, generator)

    values = dict(zip(out.terms, torch.stack(list(out.terms.values())).float().tolist()))  # one sync
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"non-finite loss at step {ctx.step + 1} (epoch {epoch}, batch {epoch_step}): {values}. "
            "The run stops without saving this step; resume restarts from the last checkpoint. "
            "Try a lower optim.lr, optim.amp=fp32, or check the input data."
        )
    if out.optimize:
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(out.loss).backward()
        if config.optim.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.model.query.parameters(), config.optim.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    out.enqueue()  # after backward: the graph saved the queue buffer, an earlier in-place write would break it
    ctx.step += 1
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)  # honest compute time; the loss sync above covered forward only
    return values


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_one_epoch(
    ctx: Context,
    batches: Iterator[dict[str, torch.Tensor]],
    epoch: int,
    start_step: int,
    on_step: Callable[[int, int, dict[str, float], float, float], bool],
) -> bool:
    """Run the steps of one epoch from `start_step`. After each step `on_step(epoch, epoch_step,
    values, data_seconds, compute_seconds)` logs and checkpoints; it returns True to stop early
    (SIGTERM, max_steps). Returns True when stopped early."""
    for group in ctx.optimizer.param_groups:
        group["lr"] = learning_rate(ctx.config.optim, epoch)
    ctx.model.train()
    epoch_step = start_step
    tick = time.perf_counter()
    for batch in batches:
        fetched = time.perf_counter()
        values = train_step(ctx, to_device(batch, ctx.device), epoch, epoch_step)
        done = time.perf_counter()
        epoch_step += 1
        if on_step(epoch, epoch_step, values, fetched - tick, done - fetched):
            return True
        tick = time.perf_counter()
    return False


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors since start (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

