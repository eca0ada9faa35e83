"""The kernels tvl1-torch's solver runs: the eager reference, and the fused fast path.

Both paths run the same steps (preprocess/flow_torch.py); they differ in how:

* `eager`: one PyTorch op at a time, the error norm summed in float32. The reference the other
  paths are tested against, and the default on the CPU (no compile warm-up).
* `compiled`: `torch.compile` (inductor) fuses one inner iteration (~76 launches in eager
  become a few kernels), the masked 5x5 median and the bicubic warp likewise; a chunk runs the
  compiled iteration `n` times. Not `n` iterations compiled as one unrolled graph: the stencils
  (the divergence reads p's neighbours, the gradient u's) keep inductor from fusing across
  iterations, so that gives the same kernels for ~3.5x the compile time (48 s against 14 s on
  the 2-core CPU at 240x320; a chunk of 10 ran 29 and 31 ms). Shapes are dynamic, so one
  compilation serves every pyramid level and batch size. A chunk reads nothing back to
  the host and copies nothing: the convergence test stays on the device in the `active` flags,
  so a chunk is a fixed-shape, capturable unit of work. The update norm is summed in float64
  inside the chunk: a float32 sum depends on the reduction order, which inductor chooses per
  shape, so a pair's stopping iteration could depend on which other pairs share its batch; in
  float64 it does not (to ~1e-16 relative), and cross-video batching stays byte-identical.

On CUDA the fast path's chunks also run as CUDA graphs (`ChunkGraphs`): one graph per chunk
length and working shape, replayed in place on static copies of the state, so a chunk costs one
launch however many kernels it holds. That matters most in the tail of a batch, where a few
pairs that converge late (a scene cut never does) run thousands of iterations on a small batch
and the host, not the GPU, would set the pace.

Converged pairs leave the working batch in buckets: the batch shrinks only to a size from the
fixed set {2, 4, 8, ..., batch} (padded with frozen copies), so a warp compacts at most
log2(batch) times and the compiled code sees few distinct shapes. No batch has one pair: inductor
would compile a batch of one separately (a size-1 dimension is always specialised), so a lone
pair is solved next to a copy of itself.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from cvtcl.capture import Capture, cuda_capture

from preprocess.flow_torch_ops import median_blur, tvl1_iteration, warp_bicubic

PATHS = ("eager", "compiled")


def masked_median(u1: torch.Tensor, u2: torch.Tensor, active: torch.Tensor, ksize: int):
    """The outer iteration's median of u1 and u2 ([B, H, W]) for the pairs still active."""
    return (torch.where(active, median_blur(u1, ksize), u1),
            torch.where(active, median_blur(u2, ksize), u2))


def _iteration(accumulate: torch.dtype) -> Callable:
    """One inner iteration, called as a chunk is; the update norm summed in `accumulate`."""

    def iterate(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active, threshold, l_t, theta, taut):
        return tvl1_iteration(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active, l_t, theta, taut,
                              threshold, accumulate)

    return iterate


def _chunk(once: Callable, n: int) -> Callable:
    """`n` iterations of `once` back to back, no host read between them."""
    if n == 1:
        return once

    def iterate(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active, threshold, l_t, theta, taut):
        for _ in range(n):
            u1, u2, p11, p12, p21, p22, active = once(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active,
                                                      threshold, l_t, theta, taut)
        return u1, u2, p11, p12, p21, p22, active

    return iterate


@dataclass(frozen=True)
class Kernels:
    """What `solve_level` calls: `iterate(n)` -> chunk function, the masked median, the warp,
    the stopping threshold as the chunk takes it, and the batch bucket for a pair count."""

    path: str
    iterate: Callable[[int], Callable]
    median: Callable
    warp: Callable
    bucketed: bool

    def threshold(self, value: float, device: torch.device):
        # compiled: a device tensor, so a new level's threshold is data, not a recompile
        return value if self.path == "eager" else torch.full((), value, dtype=torch.float64, device=device)

    def bucket(self, count: int, size: int) -> int:
        """The working batch size for `count` live pairs out of `size` rows."""
        if not self.bucketed:
            return count
        return min(max(2, 1 << (count - 1).bit_length()), size)


def _compile(fn: Callable) -> Callable:
    """inductor, dynamic shapes, one graph (a graph break would mean a host round trip).
    Tests replace it with the identity to check the fast path's control flow in seconds
    (compiling takes minutes on a small CPU)."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


@functools.lru_cache(maxsize=None)
def kernels(path: str) -> Kernels:
    if path == "eager":
        once = _iteration(torch.float32)
        return Kernels(path, functools.lru_cache(maxsize=None)(lambda n: _chunk(once, n)),
                       masked_median, warp_bicubic, bucketed=False)
    if path == "compiled":
        once = _compile(_iteration(torch.float64))
        return Kernels(path, functools.lru_cache(maxsize=None)(lambda n: _chunk(once, n)),
                       _compile(masked_median), _compile(warp_bicubic), bucketed=True)
    raise ValueError(f"tvl1-torch path must be one of {PATHS}, got {path!r}")


def default_path(device: torch.device) -> str:
    """The fast path on a GPU (launch-bound in eager); eager on the CPU, where inductor's compile
    costs a minute or more per worker process for 1.1x (benchmarks/results/2026-12-04-cpu-epyc-2core).
    GPUs older than Volta solve eagerly too (TorchTVL1._setup: Triton needs capability 7.0)."""
    return "compiled" if device.type == "cuda" else "eager"


@dataclass
class _Graph:
    replay: Callable[[], None]
    state: list[torch.Tensor]  # static u1, u2, p11, p12, p21, p22, active: each replay iterates them in place
    data: list  # static I1wx, I1wy, grad, rho_c, threshold (a float is part of the graph's key)
    sources: list  # weak references to the tensors of `data` last copied in (None for a float)


class ChunkGraphs:
    """Chunks of inner iterations as graphs, one per (chunk function, working shape, constants).

    The chunks of a key run as they are in the first batch that meets it (`begin` starts a batch;
    this compiles and warms up what a graph will hold, and a frame size met in one batch only, as
    in a dataset of many sizes, costs no capture); in a later batch the key's next chunk is captured
    on static copies of its inputs, its new state written back into them, and replayed. A replay
    returns the static state, so the chunks of a warp pass it on without a copy; only inputs that
    are not the static tensors (a compacted batch, a new warp's data, the median's new u) are
    copied in. Graphs share one memory pool: they run one at a time, and keep nothing there
    between replays; at most `MAX_GRAPHS` are kept (the least recently used goes
    first, with its static tensors). A capture that fails turns the graphs off for this object, the
    reason in `error`; the chunks then run as they are. `capture` is `cuda_capture` on a GPU
    (cvtcl.capture.recorded_capture in CPU tests)."""

    MAX_GRAPHS = 96  # 240x320 at batch 64: 30 graphs (5 levels x 6 buckets), ~1 GB of static tensors

    def __init__(self, capture: Capture | None = None):
        self.capture = capture
        self._pool = None  # the graphs' shared memory pool (CUDA), made at the first capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.first_batch: dict[tuple, int] = {}  # key -> the batch that first met it
        self.batch = 0
        self.error: str | None = None

    def begin(self) -> None:
        """A new batch of pairs: keys met in earlier batches may be captured now."""
        self.batch += 1
        if len(self.first_batch) > 20 * self.MAX_GRAPHS:  # many frame sizes: forget the old ones
            self.first_batch.clear()

    def __call__(self, iterate: Callable, state: list[torch.Tensor], data: list, consts: tuple) -> list[torch.Tensor]:
        """iterate(u1, u2, p11, p12, p21, p22, I1wx, I1wy, grad, rho_c, active, threshold, *consts)
        for state = [u1, ..., p22, active] and data = [I1wx, I1wy, grad, rho_c, threshold]."""
        key = (iterate, tuple(state[0].shape), state[0].device,
               tuple(None if isinstance(d, torch.Tensor) else d for d in data), consts)
        graph = self.graphs.get(key)
        if graph is None and (self.error is not None or self.first_batch.setdefault(key, self.batch) == self.batch):
            return run_chunk(iterate, state, data, consts)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(iterate, state, data, consts)
            except Exception as err:  # any failure: solve without graphs, and say why
                self.error = f"{type(err).__name__}: {err}"[:500]
                warnings.warn(f"tvl1-torch: capturing CUDA graphs failed ({self.error}); this process computes "
                              "flow without them from here on (the same flow, slower)", RuntimeWarning, stacklevel=2)
                return run_chunk(iterate, state, data, consts)
            if len(self.graphs) > self.MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for static, given in zip(graph.state, state):
            if static is not given:
                static.copy_(given)
        for i, (static, given) in enumerate(zip(graph.data, data)):
            if isinstance(given, torch.Tensor) and graph.sources[i]() is not given:
                static.copy_(given)
                graph.sources[i] = weakref.ref(given)
        graph.replay()
        return list(graph.state)

    def _capture(self, iterate, state, data, consts) -> _Graph:
        static_state = [t.clone() for t in state]
        static_data = [d.clone() if isinstance(d, torch.Tensor) else d for d in data]

        def body() -> None:
            for static, new in zip(static_state, _call(iterate, static_state, static_data, consts)):
                static.copy_(new)

        if self.capture is not None:
            replay, _ = self.capture(body)
        else:
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            replay, _ = cuda_capture(body, pool=self._pool)
        return _Graph(replay, static_state, static_data,
                      [weakref.ref(d) if isinstance(d, torch.Tensor) else None for d in data])


def run_chunk(iterate: Callable, state: list[torch.Tensor], data: list, consts: tuple) -> list[torch.Tensor]:
    """A chunk without graphs, called as `ChunkGraphs` is."""
    return list(_call(iterate, state, data, consts))


def _call(iterate, state, data, consts):
    return iterate(*state[:6], *data[:4], state[6], data[4], *consts)
