"""run.compile=graph|step: the whole training step as one CUDA graph with static buffers.

`graph` captures the eager step (no torch.compile: the capture takes seconds, and a compiler
failure cannot stop it); `step` captures the step with torch.compile'd encoders (fused kernels
on top, after a compile of a minute or more).

After `WARMUP_STEPS` eager steps of this process (cuDNN autotune, torch.compile of the encoders,
the optimizer's state, lazy CUDA setup; on a side stream, as CUDA graph capture requires), the
step body (`engine.step_body`: EMA, forward, backward, fused Adam, enqueue) is captured once on
static inputs: the batch, and the permutations and flags of `engine.StepDraws`. Each later step
copies its batch and draws into those buffers and replays the graph: a few launches instead of
~2,000. The step has no host sync (tests/test_step_audit.py), which is what makes it capturable.

What a capture fixes must not change, so the step is captured again when it would: another
learning rate (the milestones) or the stage-2 queue turning full, each time after another
`WARMUP_STEPS` eager steps (anything the new setting creates lazily, such as the optimizer's
state at stage 2's first update, must exist before a capture, or the graph would re-create it at
every replay). It is not used where it cannot hold: world size > 1 (collectives), fp16 (the
GradScaler's host logic), run.legacy_step, devices other than CUDA. A capture that fails leaves
the eager step for the rest of the run, the reason in `ctx.graph.error` (benchmarks/train_speed.py
reports it).

CPU tests swap the CUDA capture for `cvtcl.capture.recorded_capture`, which keeps a CUDA graph's
semantics without a GPU: a step that read anything from the host that changes between steps would
replay with the stale value and differ from the eager step (tests/test_graphed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cvtcl import distributed, engine
from cvtcl.capture import Capture, cuda_capture
from cvtcl.moco import Permutation

WARMUP_STEPS = 3


@dataclass
class GraphState:
    """Per process: eager warm-up steps done, the current captured step, why capture failed."""

    capture: Capture
    warmed: int = 0
    step: GraphedStep | None = None
    error: str | None = None
    captures: list[tuple] = field(default_factory=list)  # the key of every capture made


def usable(ctx: engine.Context) -> bool:
    config = ctx.config
    return (config.run.captures_step and ctx.device.type == "cuda" and distributed.world_size() == 1
            and not config.run.legacy_step and not ctx.scaler.is_enabled())


def capture_key(ctx: engine.Context) -> tuple:
    """What a capture bakes in: the learning rates and whether the queue is full."""
    return tuple(group["lr"] for group in ctx.optimizer.param_groups), ctx.model.queue.is_full


class GraphedStep:
    """The step body captured on static copies of one batch and its draws."""

    def __init__(self, ctx: engine.Context, batch: dict[str, torch.Tensor], draws: engine.StepDraws, capture: Capture):
        # No reference to ctx is kept: ctx holds this step (ctx.graph), and a cycle would keep the
        # model, the optimizer and the graph's memory pool alive after the run until the cycle
        # collector happens to run, while a schedule's next sub-stage allocates its own.
        self.key, self.queue = capture_key(ctx), ctx.model.queue
        self.batch = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.draws = [_static_copy(item) for item in reversed(draws.items)]  # in the order the step takes them
        ctx.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates (and then rewrites) them

        def body() -> tuple[list[str], torch.Tensor]:
            count = self.queue._count_on_host
            try:
                names, row, _ = engine.step_body(ctx, self.batch, engine.StepDraws.of(self.draws), grads_to_none=False)
            finally:
                self.queue._count_on_host = count  # the host mirror advances per replay (__call__), not per capture
            return names, row

        self.replay, self.outputs = capture(body)

    def __call__(self, batch: dict[str, torch.Tensor], draws: engine.StepDraws) -> tuple[list[str], torch.Tensor]:
        for name, static in self.batch.items():
            static.copy_(batch[name], non_blocking=True)
        for static, item in zip(self.draws, reversed(draws.items)):
            if isinstance(static, Permutation):
                static.order.copy_(item.order, non_blocking=True)
                static.inverse.copy_(item.inverse, non_blocking=True)
            else:
                static.copy_(item, non_blocking=True)
        self.replay()
        names, row = self.outputs()
        self.queue.counted(self.batch["video_index"].shape[0])
        return names, row.clone()  # the static row is rewritten by the next replay


def _static_copy(item):
    if isinstance(item, Permutation):
        return replace(item, order=item.order.clone(), inverse=item.inverse.clone())
    return item.clone()


def run(ctx: engine.Context, batch: dict[str, torch.Tensor], draws: engine.StepDraws) -> tuple[list[str], torch.Tensor]:
    """One step: eager, or through the captured graph once run.compile=graph|step has warmed up."""
    if ctx.graph is None and usable(ctx):
        ctx.graph = GraphState(cuda_capture)
    state: GraphState | None = ctx.graph
    if state is None or state.error is not None:
        return engine.step_body(ctx, batch, draws)[:2]
    if state.step is not None and state.step.key != capture_key(ctx):
        # A new learning rate or a full stage-2 queue: warm up eagerly again before the next capture.
        # Stage 2's first optimizing step creates Adam's moments and step counts; created inside a
        # capture, their zero-fill would be part of the graph and reset them at every replay.
        state.step, state.warmed = None, 0
    if state.warmed < WARMUP_STEPS:
        state.warmed += 1
        return _eager_on_side_stream(ctx, batch, draws)
    if state.step is None:
        try:
            state.step = GraphedStep(ctx, batch, draws, state.capture)
            state.captures.append(state.step.key)
        except Exception as err:  # any capture failure: keep training, eagerly, and say why
            state.error, state.step = f"{type(err).__name__}: {err}"[:500], None
            return engine.step_body(ctx, batch, draws)[:2]
    return state.step(batch, draws)


def _eager_on_side_stream(ctx, batch, draws) -> tuple[list[str], torch.Tensor]:
    if ctx.device.type != "cuda":
        return engine.step_body(ctx, batch, draws)[:2]
    side, current = torch.cuda.Stream(ctx.device), torch.cuda.current_stream(ctx.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        names, row, _ = engine.step_body(ctx, batch, draws)
    current.wait_stream(side)
    return names, row
