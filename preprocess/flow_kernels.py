"""The kernels tvl1-torch's solver runs: the eager reference, and the fused fast path.

Both paths run the same steps (preprocess/flow_torch.py); they differ in how:

* `eager`: one PyTorch op at a time, the error norm summed in float32. The reference the other
  paths are tested against, and the default on the CPU (no compile warm-up).
* `compiled`: `torch.compile` (inductor) fuses a chunk of `n` inner iterations into one graph
  (~76 launches per iteration in eager become a few kernels), the masked 5x5 median and the
  bicubic warp likewise. Shapes are dynamic, so one compilation serves every pyramid level and
  batch size. A chunk reads nothing back to
  the host and copies nothing: the convergence test stays on the device in the `active` flags,
  so a chunk is a fixed-shape, capturable unit of work. The update norm is summed in float64
  inside the chunk: a float32 sum depends on the reduction order, which inductor chooses per
  shape, so a pair's stopping iteration could depend on which other pairs share its batch; in
  float64 it does not (to ~1e-16 relative), and cross-video batching stays byte-identical.

Converged pairs leave the working batch in buckets: the batch shrinks only to a size from the
fixed set {2, 4, 8, ..., batch} (padded with frozen copies), so a warp compacts at most
log2(batch) times and the compiled code sees few distinct shapes. No batch has one pair: inductor
would compile a batch of one separately (a size-1 dimension is always specialised), so a lone
pair is solved next to a copy of itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from preprocess.flow_torch_ops import median_blur, tvl1_iteration, warp_bicubic

PATHS = ("eager", "compiled")


def masked_median(u1: torch.Tensor, u2: torch.Tensor, active: torch.Tensor, ksize: int):
    """The outer iteration's median of u1 and u2 ([B, H, W]) for the pairs still active."""
    return (torch.where(active, median_blur(u1, ksize), u1),
            torch.where(active, median_blur(u2, ksize), u2))


def _chunk(n: int, accumulate: torch.dtype) -> Callable:
    """`n` inner iterations back to back, no host read between them."""

    def iterate(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active, threshold, l_t, theta, taut):
        for _ in range(n):
            u1, u2, p11, p12, p21, p22, active = tvl1_iteration(
                u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active, l_t, theta, taut, threshold,
                accumulate)
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
        return Kernels(path, functools.lru_cache(maxsize=None)(lambda n: _chunk(n, torch.float32)),
                       masked_median, warp_bicubic, bucketed=False)
    if path == "compiled":
        return Kernels(path, functools.lru_cache(maxsize=None)(lambda n: _compile(_chunk(n, torch.float64))),
                       _compile(masked_median), _compile(warp_bicubic), bucketed=True)
    raise ValueError(f"tvl1-torch path must be one of {PATHS}, got {path!r}")


def default_path(device: torch.device) -> str:
    """The fast path on a GPU (launch-bound in eager); eager on the CPU, where inductor's
    compile costs a minute per worker process for about 2x."""
    return "compiled" if device.type == "cuda" else "eager"
