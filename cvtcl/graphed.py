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
every replay). It is not used where it cannot
hold: world size > 1 (collectives), fp16 (the GradScaler's host logic), run.legacy_step, devices
other than CUDA. A capture that fails leaves the eager step for the rest of the run, the reason
in `ctx.graph.error` (benchmarks/train_speed.py reports it).

CPU tests swap the CUDA capture for `recorded_capture`, which keeps a CUDA graph's semantics
without a GPU: capture records the body's aten ops and undoes their writes (a capture computes
nothing), a host read inside it raises as it does in a capture, and a replay runs the recorded
ops alone, without the Python around them, so every host-side value (a Python float, a count kept
on the host, a branch taken) stays what it was at capture. A step that read anything from the
host that changes between steps would replay with the stale value and differ from the eager step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from cvtcl import distributed, engine
from cvtcl.moco import Permutation

aten = torch.ops.aten
WARMUP_STEPS = 3
Body = Callable[[], tuple[list[str], torch.Tensor]]
Capture = Callable[[Body], tuple[Callable[[], None], Callable[[], tuple[list[str], torch.Tensor]]]]


def cuda_capture(body: Body):
    """Capture body() in a CUDA graph: (replay, the static outputs the replays refresh)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the loader's threads (DALI) may keep using CUDA while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = body()
    return graph.replay, lambda: outputs


def recorded_capture(body: Body):
    """CPU stand-in for tests, with a CUDA graph's semantics (module docstring): (replay, outputs)."""
    recorder = _Recorder()
    try:
        with recorder:
            names, row = body()
    finally:
        recorder.undo_writes()  # a capture, finished or failed, has computed nothing
    live: dict[int, torch.Tensor] = {}

    def replay() -> None:
        live.clear()

        def current(x):
            return live.get(id(x), x) if isinstance(x, torch.Tensor) else x

        with torch.no_grad():
            for func, args, kwargs, out in recorder.ops:
                new = func(*tree_map(current, args), **tree_map(current, kwargs))
                for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                    if isinstance(old, torch.Tensor):
                        live[id(old)] = fresh

    return replay, lambda: (names, live.get(id(row), row))


class _Recorder(TorchDispatchMode):
    """Records each aten op with its arguments and results (kept alive, so ids stay unique); saves
    every storage the capture did not create before an op first touches it, for `undo_writes`
    (not only the arguments a schema marks as written: native_batch_norm updates its running
    statistics in place unmarked); refuses host reads."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.created: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default or func.overloadpacket.__name__ == "nonzero":
            raise RuntimeError(f"{func.overloadpacket.__name__} reads a device value on the host: "
                               "not permitted while a CUDA graph is captured")
        for tensor in tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.created:
                self._save(tensor)
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.saved:
                self.created.add(tensor.untyped_storage().data_ptr())
        return out

    def _save(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.saved:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            self.saved[storage.data_ptr()] = (whole, whole.clone())

    def undo_writes(self) -> None:
        for whole, before in self.saved.values():
            whole.copy_(before)


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
        self.ctx, self.key = ctx, capture_key(ctx)
        self.batch = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.draws = [_static_copy(item) for item in reversed(draws.items)]  # in the order the step takes them
        ctx.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates (and then rewrites) them
        self.replay, self.outputs = capture(self._body)

    def _body(self) -> tuple[list[str], torch.Tensor]:
        queue = self.ctx.model.queue
        count = queue._count_on_host
        try:
            names, row, _ = engine.step_body(self.ctx, self.batch, engine.StepDraws.of(self.draws),
                                              grads_to_none=False)
        finally:
            queue._count_on_host = count  # the host mirror advances per replay (__call__), not per capture
        return names, row

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
        self.ctx.model.queue.counted(self.batch["video_index"].shape[0])
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
