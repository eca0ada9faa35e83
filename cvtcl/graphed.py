"""run.compile=graph|step: the training step as CUDA graphs with static buffers: the whole step
in one process, each encoder call under torchrun (run.graph_scope).

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
every replay). It is not used where it cannot hold: fp16 (the GradScaler's host logic),
run.legacy_step, devices other than CUDA. A capture that fails leaves the eager step for the rest
of the run, the reason in `ctx.graph.error` (cvtcl.train warns once; train_speed.py records it).

Under torchrun (run.graph_scope=auto) the step's collectives (shuffle-BN's all_to_all and
all_gather, DDP's gradient all-reduce) stay outside any graph: `CallGraphs` captures each encoder
call of the step instead, the forward and, where it trains, the backward (an autograd function
that replays them; DDP's hooks fire on the gradients it returns, as they do for the eager
encoder). The query's clip and local segments are one call (`engine.encode_queries`), so their
gradients are summed inside its backward graph. Counted on the meta device
(tests/test_step_audit.py), S3D's stage-1 step goes from 1,985 launches to 130 and 4 replays;
the losses, Adam, the EMA and the collectives stay eager. Nothing a call graph fixes changes
between steps (no learning rate or queue inside), so each call is captured once.
run.compile=step under torchrun compiles the encoders without graphs.

CPU tests swap the CUDA capture for `cvtcl.capture.recorded_capture`, which keeps a CUDA graph's
semantics without a GPU: a step that read anything from the host that changes between steps would
replay with the stale value and differ from the eager step (tests/test_graphed.py).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from cvtcl import distributed, engine
from cvtcl.capture import Capture, cuda_capture, new_pool
from cvtcl.moco import Permutation

WARMUP_STEPS = 3


@dataclass
class GraphState:
    """Per process: eager warm-up steps done, the current captured step, why capture failed."""

    capture: Capture
    scope: str = "step"  # "step": the whole step as one graph; "calls": each encoder call (CallGraphs)
    warmed: int = 0
    step: GraphedStep | None = None
    calls: CallGraphs | None = None
    error: str | None = None
    captures: list[tuple] = field(default_factory=list)  # the key of every capture made

    def release(self) -> None:
        """Drop the graphs and their memory (the encoders go back to eager calls)."""
        self.step = None
        if self.calls is not None:
            self.calls.uninstall()


def scope(ctx: engine.Context) -> str | None:
    """What run.compile=graph|step captures here: "step", "calls", or None (no graphs)."""
    config = ctx.config
    if not config.run.captures_step or ctx.device.type != "cuda" or config.run.legacy_step or ctx.scaler.is_enabled():
        return None
    if config.run.graph_scope != "auto":
        return config.run.graph_scope
    if distributed.world_size() == 1:
        return "step"
    return "calls" if config.run.compile == "graph" else None  # compiled encoders under torchrun: no graphs


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
    if ctx.graph is None and (chosen := scope(ctx)) is not None:
        ctx.graph = GraphState(cuda_capture, chosen)
    state: GraphState | None = ctx.graph
    if state is None or state.error is not None:
        return engine.step_body(ctx, batch, draws)[:2]
    if state.scope == "calls":
        return _run_calls(ctx, state, batch, draws)
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


def _run_calls(ctx: engine.Context, state: GraphState, batch, draws) -> tuple[list[str], torch.Tensor]:
    if state.calls is None:
        state.calls = CallGraphs(state)
        state.calls.install([ctx.model.query, ctx.model.key, *([ctx.sampler.encoder] if ctx.sampler else [])])
    with state.calls.active():
        return engine.step_body(ctx, batch, draws)[:2]


class CallGraphs:
    """Each encoder call of a training step as CUDA graphs of its own (run.graph_scope=calls).

    Installed as `Encoder.graphs`, it receives the encoders' calls. Outside a step (a kNN check)
    they run eagerly; in a step, the i-th call of an encoder is keyed also by what a graph fixes
    (the inputs' shapes, strides and dtypes, grad mode, train mode; autocast is the run's), runs
    eagerly the first `WARMUP_STEPS` times its key is met (cuDNN's autotune, lazy CUDA setup: not
    inside a capture; stage 2's first training step meets new keys after its no-grad warm-up
    steps), is captured the next time and replayed from then on. Each call's graphs have a
    memory pool of their own: the calls' forwards all replay before their backwards, in the other
    order than a shared pool would need. A capture that fails turns the graphs off (the reason in
    the state's `error`)."""

    def __init__(self, state: GraphState):
        self.state: GraphState = weakref.proxy(state)  # weak: the state holds this object
        self.graphs: dict[tuple, CallGraph] = {}
        self.calls: dict[int, int] = {}  # id(encoder) -> its calls so far in this step
        self.seen: dict[tuple, int] = {}  # key -> eager calls so far (warm-up)
        self.encoders: list[weakref.ref] = []  # weak: the encoders hold this object (no cycle to collect)
        self.on = False

    def install(self, encoders: list[nn.Module]) -> None:
        self.encoders = [weakref.ref(encoder) for encoder in encoders]
        for encoder in encoders:
            encoder.graphs = self

    def uninstall(self) -> None:
        for ref in self.encoders:
            if (encoder := ref()) is not None:
                encoder.__dict__.pop("graphs", None)
        self.graphs.clear()

    def __deepcopy__(self, memo):
        return None  # a copy of an encoder (features.py's batch-norm copy) calls eagerly

    @contextmanager
    def active(self):
        self.calls.clear()
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def __call__(self, encoder: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not self.on or self.state.error is not None or any(x.requires_grad for x in inputs):
            return encoder.embed_each(inputs)
        index = self.calls[id(encoder)] = self.calls.get(id(encoder), 0) + 1
        key = (id(encoder), index, *((tuple(x.shape), x.stride(), x.dtype) for x in inputs), torch.is_grad_enabled(),
               encoder.training)
        graph = self.graphs.get(key)
        if graph is None and self.seen.get(key, 0) < WARMUP_STEPS:
            self.seen[key] = self.seen.get(key, 0) + 1
            return encoder.embed_each(inputs)
        if graph is None:
            try:
                graph = self.graphs[key] = CallGraph(encoder, inputs, self.state.capture)
            except Exception as err:  # any capture failure: eager calls from here on, and say why
                self.state.error = f"{type(err).__name__}: {err}"[:500]
                return encoder.embed_each(inputs)
            self.state.captures.append(key[1:])
        if not graph.params:
            return graph.forward(*inputs)
        return _Replayed.apply(graph, *inputs, *graph.params)


class CallGraph:
    """One encoder call captured on static copies of its inputs: the forward, and where gradients
    flow, the backward of its outputs to the encoder's parameters (not to the inputs: clips). A
    call of several inputs sums their gradients inside the backward graph."""

    def __init__(self, encoder: nn.Module, inputs: tuple[torch.Tensor, ...], capture: Capture):
        self.inputs = [x.detach().clone() for x in inputs]
        self.params = [p for p in encoder.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        pool = new_pool(capture)
        self.replay_forward, self.outputs = capture(lambda: encoder.embed_each(tuple(self.inputs)), pool)
        if self.params:
            outs = self.outputs()
            self.grads_in = [torch.zeros_like(out) for out in outs]
            self.replay_backward, self.grads = capture(
                lambda: torch.autograd.grad(outs, self.params, self.grads_in, allow_unused=True), pool)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.replay_forward()
        return tuple(out.detach() for out in self.outputs())  # rewritten by this call's next replay, next step

    def backward(self, *grads: torch.Tensor) -> list[torch.Tensor | None]:
        for static, grad in zip(self.grads_in, grads):
            static.copy_(grad)
        self.replay_backward()
        return [g if g is None else g.detach() for g in self.grads()]


class _Replayed(torch.autograd.Function):
    """An encoder call as one autograd node: forward and backward replay the call's graphs, and
    the parameters' gradients go where the eager call's would (their AccumulateGrad, DDP's hooks)."""

    @staticmethod
    def forward(ctx, graph: CallGraph, *inputs_and_params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.graph = graph
        return graph.forward(*inputs_and_params[:len(graph.inputs)])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the replayed backward builds no graph of its own
    def backward(ctx, *grads: torch.Tensor):
        return None, *[None] * len(ctx.graph.inputs), *ctx.graph.backward(*grads)
