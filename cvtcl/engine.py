"""The training loop shared by both stages (paper §2.1-2.4; after mae's engine_pretrain.py).

One optimizer step is the same for every stage:

    draw the step's random numbers (host, before the step) -> momentum update of the key encoder
    -> stage step (forward + loss terms, autocast) -> backward (GradScaler in fp16)
    -> optimizer step, skipped on the device when the loss is not finite -> enqueue keys

Only the stage step differs. It lives in `STEPS[config.stage.kind]`: a function
`(ctx, batch, draws) -> StepOutput` returning the weighted loss, detached terms to log, a
closure that enqueues this step's keys, and whether to update the weights at all; `DRAWS[kind]`
lists the random numbers it takes from `draws`, in order. Stage 1 is `instance_step` below;
stage 2 (co-training) registers "cotrain" with its own step function (sampler forward, mined
positives, its own queue, no update until that queue is full) and the loop, checkpoints and
metrics stay as they are. Stage 2's queue is part of `ctx.model` (checkpointed, resumed); its
frozen sampler is `ctx.sampler`, loaded again from stage.sampler_checkpoint at every (re)start.

An ordinary step never makes the host wait for the GPU (tests/test_step_audit.py counts it on the
meta device): its logged terms stay on the device as one row (`StepTerms`) until a log step
reads the window's rows at once (`read_terms`), which also names the first non-finite step.
`run.legacy_step` restores the old step's per-step syncs (the benchmarks' baseline).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvtcl import augment, distributed, losses, mining
from cvtcl.capture import inductor_unsupported, share_compile_threads
from cvtcl.config import OptimConfig, TrainConfig
from cvtcl.moco import MomentumContrast, Permutation, to_device_async


PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # an autocast dtype as optim.amp names it


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


def autocast(ctx: Context) -> contextlib.AbstractContextManager:
    """Autocast to ctx.autocast_dtype; no context at all in fp32 (torch.autocast refuses the meta device
    that cvtcl.step_audit counts syncs on, even disabled)."""
    if ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    # a CUDA graph must not capture autocast's cache of cast weights (they change every step)
    return torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype, cache_enabled=not ctx.config.run.captures_step)


def compile_encoders(model: MomentumContrast, setting: str, device: torch.device, world_size: int = 1) -> None:
    """run.compile: "encoder" and "step" compile the query and key encoders in place
    (`nn.Module.compile`, state-dict keys unchanged) as whole graphs; "graph" and "step" capture
    the whole step in a CUDA graph on CUDA (cvtcl/graphed.py), "graph" with the eager encoders (no
    compile wait). Under DDP graphs may break at buckets.

    Every Encoder's compiled code hangs on one code object (`Encoder.forward`), and torch.compile
    allows it 8 entries (shapes, grad mode, modality). A run needs up to 6; kept across the
    sub-stages of a schedule they passed 8 in the first co-training sub-stage, which with
    fullgraph=True stops training. So each run starts from an empty cache (the encoders compiled
    before are gone anyway), and shapes stay static (no automatic dynamic shapes: a run's clip
    and segment shapes never change, and CUDA graphs want them fixed)."""
    if setting in ("none", "graph"):
        return
    too_old = inductor_unsupported(device)
    if too_old:
        raise ValueError(f"run.compile={setting} needs a GPU of compute capability 7.0 or newer (inductor's "
                         f"kernels are Triton's); this one is {too_old}: use run.compile=graph or none")
    torch._dynamo.reset()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # torchrun's: this node's processes
    if local > 1:  # they compile at once
        share_compile_threads(local)
    for encoder in (model.query, model.key):
        encoder.compile(fullgraph=world_size == 1, dynamic=False)


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
    graph: Any = None  # run.compile=graph|step on CUDA: warm-up count and captured step (cvtcl.graphed.GraphState)
    fetching: bool = False  # the loop waits for the loader: every step so far is whole (train_one_epoch)


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


def split_key_batch_norm(device: torch.device) -> bool:
    """Whether the step draws interleaved permutations, so the key encoder encodes every BN group
    in one call with split BatchNorms: where launches cost (a GPU, the meta device that stands for
    one). On the CPU one call per BN group is faster (demo size, one thread: 315-320 vs 360-400 ms
    a step, larger convolutions and the [n/g, g*C] view's BN being slower there). Same keys."""
    return device.type != "cpu"


class StepDraws:
    """The random numbers of one step, drawn on the host before it from the step's generator, in
    the order the step uses them (so the values are those the old in-step draws gave).

    `spec` lists them: ("perm", N) a shuffle-BN permutation of N global samples, ("flag", p) a
    Bernoulli(p) decision (stage 2's self-positive drop) as a device bool. Permutations reach the
    device by non-blocking copies from pinned memory (cvtcl.moco.to_device_async).
    """

    def __init__(self, ctx: Context, spec: list[tuple[str, float]], generator: torch.Generator):
        legacy = ctx.config.run.legacy_step
        groups = ctx.model.bn_groups if split_key_batch_norm(ctx.device) else 0
        self.items: list = []
        for kind, value in spec:
            if kind == "perm":
                self.items.append(Permutation.draw(int(value), generator, ctx.device, groups, legacy))
            else:
                drop = mining.self_positive_drop(value, generator)  # a CPU draw: no device sync
                self.items.append(torch.tensor(drop, device=ctx.device) if legacy else
                                  to_device_async(torch.tensor(drop), ctx.device))
        self.items.reverse()  # popped from the end

    @classmethod
    def of(cls, items: list) -> StepDraws:
        """Draws already made (in the order the step takes them): cvtcl.graphed's static buffers."""
        draws = cls.__new__(cls)
        draws.items = list(reversed(items))
        return draws

    def permutation(self) -> Permutation:
        item = self.items.pop()
        assert isinstance(item, Permutation), "the step took its draws in another order than DRAWS says"
        return item

    def flag(self) -> torch.Tensor:
        item = self.items.pop()
        assert isinstance(item, torch.Tensor), "the step took its draws in another order than DRAWS says"
        return item


def instance_step(ctx: Context, batch: dict[str, torch.Tensor], draws: StepDraws) -> StepOutput:
    """Stage 1: L1 = alpha * L_InfoNCE (eq. 1) + beta * L_LTCL (eqs. 6-8), one modality."""
    config, model = ctx.config, ctx.model
    modality, tau = config.stage.modality, config.loss.tau
    clips = batch[modality]  # [B, V=2, C, T, H, W]: copy 0 = query, copy 1 = key
    queue = model.queue.keys  # [K, D]; enqueued only after backward (autograd saved this buffer)

    z, z_local = encode_queries(ctx, batch)  # [B, D], [B, Mq, D] (None without L_LTCL)
    keys = model.encode_keys(clips[:, 1], draws.permutation())  # [B, D]
    logits = losses.contrastive_logits(z, keys, queue, tau)  # [B, 1 + K], once for the loss and its accuracy
    instance = losses.positive_first_nce(logits)
    terms = {"loss_instance": instance.detach(), "top1_instance": losses.top1(logits.detach())}
    loss = config.loss.instance_weight * instance
    if config.uses_segments:
        ltcl, ltcl_terms = ltcl_step(ctx, batch, draws, z_local)
        loss = loss + config.loss.ltcl_weight * ltcl
        terms |= ltcl_terms
    terms["loss"] = loss.detach()
    video_index, group = batch["video_index"], batch["group"]
    return StepOutput(loss, terms, enqueue=lambda: model.queue.enqueue(keys, video_index, group))


def encode_queries(ctx: Context, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query copy's clip embedding [B, D] and, with L_LTCL, its local queries' [B, Mq, D], in
    ONE call of the query encoder: one DDP forward, and under per-call CUDA graphs one graph
    whose backward sums the two inputs' gradients (rather than one add per parameter outside)."""
    config = ctx.config
    clips = batch[config.stage.modality][:, 0]  # [B, C, T, H, W]
    if not config.uses_segments:
        return ctx.query(clips), None
    segments = clip_segments(batch, config.stage.modality, config.data.num_segments)[:, 0]  # [B, M, C, L, H, W]
    queries = losses.query_segments(segments, config.loss.local_queries)  # [B, Mq, C, L, H, W]
    z, z_local = ctx.query(clips, queries.flatten(0, 1))
    return z, z_local.unflatten(0, queries.shape[:2])


def ltcl_step(ctx: Context, batch: dict[str, torch.Tensor], draws: StepDraws,
              z_local: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_LTCL = L_local + L_LT (eqs. 6-8) of the trained modality, unweighted, with its logged
    terms, given the local queries' embeddings `z_local` [B, Mq, D] (`encode_queries`).

    Shared by both stages. Local keys go through the key encoder's shuffle-BN like the global keys
    (shuffle, encode, un-shuffle), so key segment j of row b belongs to video b; the authors'
    stage-2 code un-shuffled keys it had never shuffled (docs/algorithm.md "Known defects").
    """
    config, model = ctx.config, ctx.model
    segments = clip_segments(batch, config.stage.modality, config.data.num_segments)  # [B, V, M, C, L, H, W]
    perm = draws.permutation()
    k_local = encode_segments(lambda x: model.encode_keys(x, perm), segments[:, 1])  # [B, M, D]
    local = losses.local_loss(z_local, k_local, model.queue.keys, config.loss.tau)
    temporal = losses.local_temporal_loss(z_local, k_local, config.loss.tau)
    return local + temporal, {
        "loss_local": local.detach(),
        "loss_temporal": temporal.detach(),
        "top1_temporal": losses.temporal_top1(z_local.detach(), k_local),
    }


def instance_draws(config: TrainConfig, global_batch: int) -> list[tuple[str, float]]:
    """Stage 1 takes the permutation of the clips' keys, then that of the segments' keys."""
    spec = [("perm", global_batch)]
    if config.uses_segments:
        spec.append(("perm", global_batch * config.data.num_segments))
    return spec


# Stage kind -> step function, and what it draws. Stage 2 registers "cotrain" (module docstring).
STEPS: dict[str, Callable[[Context, dict[str, torch.Tensor], StepDraws], StepOutput]] = {
    "instance": instance_step,
}
DRAWS: dict[str, Callable[[TrainConfig, int], list[tuple[str, float]]]] = {
    "instance": instance_draws,
}


@dataclass
class StepTerms:
    """The logged terms of one step, still on the device: names and one fp32 row."""

    names: list[str]
    row: torch.Tensor  # [len(names)]
    step: int  # 1-based number of the step
    epoch: int
    epoch_step: int


def read_terms(steps: list[StepTerms]) -> list[dict[str, float]]:
    """The terms of `steps` as floats, in one device read; FloatingPointError naming the first
    step whose loss or gradients are not finite (its update was skipped, and no checkpoint has been
    written since)."""
    if not steps:
        return []
    rows = torch.stack([s.row for s in steps]).tolist()  # the one sync of a log window
    values = [dict(zip(s.names, row)) for s, row in zip(steps, rows)]
    for s, v in zip(steps, values):
        grads_nonfinite = v.pop(GRADS_NONFINITE)
        if not math.isfinite(v["loss"]) or grads_nonfinite:
            what = "loss" if not math.isfinite(v["loss"]) else "gradient (the loss is finite)"
            raise FloatingPointError(
                f"non-finite {what} at step {s.step} (epoch {s.epoch}, batch {s.epoch_step}): {v}. "
                "Its update was skipped and the run stops without saving; resume restarts from the last "
                "checkpoint. Try a lower optim.lr or check the input data; a bf16/fp16 run may also try optim.amp=fp32."
            )
    return values


GRADS_NONFINITE = "grads_nonfinite"  # the last entry of a step's row: 1 where non-finite gradients skipped its update


def train_step(ctx: Context, batch: dict[str, torch.Tensor], epoch: int, epoch_step: int) -> StepTerms:
    """One optimizer step on `batch`; returns its logged terms on the device (no host sync).

    A non-finite loss skips the optimizer update on the device (fused Adam's found_inf; on the
    CPU, where a read is free, by a host check) and is reported by `read_terms`. With
    run.compile=graph|step on CUDA the step after the warm-up ones replays as one CUDA graph (cvtcl/graphed.py).
    """
    from cvtcl import graphed

    config = ctx.config
    global_batch = batch[config.stage.modality].shape[0] * distributed.world_size()
    draws = StepDraws(ctx, DRAWS[config.stage.kind](config, global_batch), step_generator(config.run.seed, ctx.step))
    if config.data.dihedral:
        batch = dict(batch)  # the caller's dict keeps its tensors
        augment.dihedral_(batch, augment_generator(config.run.seed, ctx.step, ctx.rank))
    names, row = graphed.run(ctx, batch, draws)
    terms = StepTerms(names, row, ctx.step + 1, epoch, epoch_step)
    if config.run.legacy_step:
        read_terms([terms])  # the old step's per-step read (and its immediate stop)
    ctx.step += 1
    if config.run.legacy_step and ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return terms


def step_body(ctx: Context, batch: dict[str, torch.Tensor], draws: StepDraws,
              grads_to_none: bool = True) -> tuple[list[str], torch.Tensor, bool]:
    """EMA, forward, backward, optimizer, enqueue: (term names, terms row, whether it optimized).
    `grads_to_none=False` in a CUDA-graph capture: the gradients are None then, the captured
    backward allocates them and every replay rewrites them in place."""
    config = ctx.config
    ctx.model.momentum_update(config.loss.momentum)  # before the keys of this step are computed
    with autocast(ctx):
        out = STEPS[config.stage.kind](ctx, batch, draws)
    grads_nonfinite = None
    if out.optimize:
        ctx.optimizer.zero_grad(set_to_none=grads_to_none)
        ctx.scaler.scale(out.loss).backward()
        norm = None  # fp16: the GradScaler checks the gradients
        if config.optim.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            norm = nn.utils.clip_grad_norm_(ctx.model.query.parameters(), config.optim.grad_clip)
        elif not ctx.scaler.is_enabled():  # one read of every gradient, on the device
            norm = nn.utils.get_total_norm([p.grad for p in ctx.model.query.parameters() if p.grad is not None])
        grads_nonfinite = optimizer_step(ctx, out.loss.detach(), norm)
    if grads_nonfinite is None:
        grads_nonfinite = torch.zeros((), device=out.loss.device)
    row = torch.stack([*out.terms.values(), grads_nonfinite]).float()
    out.enqueue()  # after backward: the graph saved the queue buffer, an earlier in-place write would break it
    return [*out.terms, GRADS_NONFINITE], row, out.optimize


def optimizer_step(ctx: Context, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor | None:
    """The optimizer step, skipped when `loss` or the gradients' norm is not finite (a finite loss
    can still give an inf or NaN gradient). Fused Adam (CUDA) takes that decision on the device
    from `found_inf`, as it does for the GradScaler; elsewhere a host read decides (free on the
    CPU). Returns 1.0 where the gradients were not finite, else 0.0 (on the device), or None in
    fp16, where the GradScaler's own found_inf skips a step of non-finite gradients: a routine
    event while it finds its scale, not a reason to stop."""
    if ctx.scaler.is_enabled():
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        return None
    finite = torch.isfinite(loss + grad_norm)  # inf or NaN in either (two huge finite values: not a step to take)
    if ctx.optimizer.defaults.get("fused"):
        ctx.optimizer.found_inf = (~finite).float()
        try:
            ctx.optimizer.step()
        finally:
            del ctx.optimizer.found_inf
    elif bool(finite):
        ctx.optimizer.step()
    return (~torch.isfinite(grad_norm)).float()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ChildSignalsAfterStep:
    """torch's DataLoader reports a worker's death from its SIGCHLD handler, raising in whatever the
    main thread runs: mid-step, that left the model half updated, and a stop whose signal ended the
    workers too (a job's SIGTERM to all its processes) could not checkpoint the steps done. During a
    step the signal is noted; its handler runs before the next batch is fetched. No handler of
    Python's (DALI's loader sets one only while it waits): nothing is changed."""

    def __init__(self):
        self.held: Any = None  # the handler whose signal came during the step

    @contextlib.contextmanager
    def during_step(self) -> Iterator[None]:
        handler = signal.getsignal(signal.SIGCHLD)
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            yield
            return
        signal.signal(signal.SIGCHLD, lambda signum, frame: setattr(self, "held", handler))
        try:
            yield
        finally:
            signal.signal(signal.SIGCHLD, handler)

    def deliver(self) -> None:
        """Run the handler of a signal held during the last step (it raises if a worker died)."""
        handler, self.held = self.held, None
        if handler is not None:
            handler(signal.SIGCHLD, None)


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
    batches = iter(batches)
    child_signals = ChildSignalsAfterStep()
    while True:
        # stays True when the loader raises: a failure there (a signal that ended its workers too)
        # left no step half done
        ctx.fetching = True
        child_signals.deliver()
        try:
            batch = next(batches)
        except StopIteration:
            ctx.fetching = False
            return False
        ctx.fetching = False
        fetched = time.perf_counter()
        with child_signals.during_step():
            values = train_step(ctx, to_device(batch, ctx.device), epoch, epoch_step)
        done = time.perf_counter()
        epoch_step += 1
        if on_step(epoch, epoch_step, values, fetched - tick, done - fetched):
            return True
        tick = time.perf_counter()


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors since start (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux



def memory_report(device: torch.device) -> str:
    """The device's memory as an out-of-memory error should report it: its size, what is free,
    this process's tensor peak, and what the caching allocator holds beyond the live tensors."""
    if device.type != "cuda":
        return f"{device}, process peak {peak_memory_gib(device):.1f} GiB"
    free, total = torch.cuda.mem_get_info(device)
    peak, reserved = peak_memory_gib(device), torch.cuda.memory_reserved(device) / 2**30
    report = (f"{torch.cuda.get_device_name(device)}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free, "
              f"tensors peaked at {peak:.1f} GiB, the allocator holds {reserved:.1f} GiB")
    if reserved - peak > 0.05 * total / 2**30:  # held in blocks too small for the request
        report += "; fragmented: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may let it fit"
    return report
