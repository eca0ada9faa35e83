"""Batched TV-L1 optical flow in PyTorch, step for step as OpenCV contrib's CPU DualTVL1.

The `tvl1-torch` preprocessing backend. It runs the duality-based TV-L1 scheme of Zach, Pock and
Bischof (2007) in the form of Sanchez, Meinhardt-Llopis and Facciolo (IPOL 2013) exactly as
`cv::optflow::DualTVL1OpticalFlow` runs it on the CPU, on many frame pairs at once (fp32). This
module owns the solver's control flow (pyramid, warps, outer and inner iterations, stopping);
the steps themselves are preprocess/flow_torch_ops.py, and the kernels that run them (the eager
reference or the fused fast path) preprocess/flow_kernels.py.

* frames are u8 converted to float without rescaling (0..255), one pyramid per frame;
* per level, dual variables p reset to zero once per level, not per warp;
* per warp, the second frame and its gradient are sampled at x + u (bicubic, zero outside);
* per outer iteration, the 5x5 median of u, then the inner iterations;
* a warp stops when sum |u_new - u_old|^2 over the level <= epsilon^2 * area;
* between levels the flow is resized (INTER_LINEAR) to the finer size and multiplied by
  1 / scale_step.

Convergence without host synchronisation: every pair carries an `active` flag on the device.
Each inner iteration computes all working pairs, then keeps the new u and p only where the pair
was still active (`torch.where`) and clears the flag of pairs whose update norm fell below the
threshold, so each pair stops at the iteration where OpenCV's loop would stop it. The inner
iterations run in chunks of `sync_every`; the host reads the flags (one synchronisation) only
between chunks and at each outer iteration, and there drops the converged pairs from the working
tensors (their state is written back to the batch) and ends the warp once none is left.

How close to OpenCV: with the stopping rule off (epsilon 0) the two agree to ~1e-4 px. With it
on, float rounding can move a pair's stop by an iteration (and so past or before a median pass);
that leaves 0.01-0.03 px mean difference on the test videos, no more than OpenCV's own output
moves (0.02-0.03 px) when one pixel of each frame changes by one grey level
(tests/test_flow_torch.py holds the agreement bounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvtcl.capture import inductor_unsupported
from preprocess.flow_kernels import PATHS, ChunkGraphs, Kernels, default_path, kernels, run_chunk
from preprocess.flow_torch_ops import (  # noqa: F401 - re-exported: the steps, tested one by one
    centred_gradient,
    divergence,
    forward_gradient,
    median_blur,
    pyramid_sizes,
    resize_linear,
    tvl1_iteration,
    warp_bicubic,
)

# cv::optflow::DualTVL1OpticalFlow defaults (OpenCV contrib tvl1flow.cpp).
DEFAULTS = {
    "tau": 0.25,
    "lambda": 0.15,
    "theta": 0.3,
    "nscales": 5,
    "warps": 5,
    "epsilon": 0.01,
    "inner_iterations": 30,
    "outer_iterations": 10,
    "scale_step": 0.8,
    "gamma": 0.0,
    "median_filtering": 5,
}


# The least memory traffic of one inner iteration per pixel (float32): its ten input planes (u1,
# u2, the four p, I1wx, I1wy, grad, rho_c) read once and its six output planes written once, the
# stencils' neighbours served from cache.
ITERATION_BYTES = (10 + 6) * 4


@dataclass
class Work:
    """What a solver ran, counted on the host from the working shapes (no synchronisation): inner
    iterations times the pixels of the rows they ran on (frozen and padding rows included, as
    they cost the same), and the pairs asked for. `ITERATION_BYTES` per pixel-iteration is the
    least memory traffic of that work, which benchmarks/flow_speed.py sets against the GPU's."""

    pixel_iterations: int = 0
    pairs: int = 0


class _Level:
    """One pyramid level of a batch of pairs: frames I0, I1 and I1's gradient, [B, H, W] each."""

    def __init__(self, i0: torch.Tensor, i1: torch.Tensor):
        self.i0 = i0
        self.i1_stack = torch.stack((i1, *centred_gradient(i1)), dim=1)  # [B, 3, H, W]


class _Warp:
    """The pairs still iterating in one warp, and every pair's state.

    Between host reads, converged pairs are frozen by the `active` mask; at a read they are
    dropped from the working tensors once the live count fits a smaller bucket (Kernels.bucket;
    eager: at every drop), so the rest of the warp costs only about the pairs still running
    (a batch otherwise runs as long as its slowest pair). A bucket larger than the live count
    is filled with frozen copies of a live pair, never written back."""

    def __init__(self, state: list[torch.Tensor], data: list[torch.Tensor], kernels: Kernels):
        self.full = state  # every pair: u1, u2, p11, p12, p21, p22, [B, H, W] each
        self.state, self.data = list(state), data  # working rows; data: I1wx, I1wy, grad, rho_c
        self.rows = None  # full-batch row of each live working row; None while all rows are the batch
        self.live = len(state[0])  # active rows at the last read
        self.active = torch.ones(self.live, 1, 1, dtype=torch.bool, device=state[0].device)
        self.kernels = kernels

    def store(self) -> list[torch.Tensor]:
        """Write the working pairs' state back into the full batch and return it."""
        if self.rows is None:
            self.full = list(self.state)
        else:
            for full, work in zip(self.full, self.state):
                full.index_copy_(0, self.rows, work[:len(self.rows)])
        return self.full

    def running(self) -> bool:
        """One host synchronisation: drop converged pairs by bucket; False once none is left."""
        count = int(self.active.sum())
        if count == self.live:
            return count > 0  # all converged at an earlier read: the warp is over, not unchanged
        self.live = count
        size = self.kernels.bucket(count, len(self.active)) if count else 0
        if size >= len(self.active):
            return True  # the frozen pairs ride along until the next bucket
        self.store()
        if count == 0:
            return False
        keep = self.active.view(-1).nonzero().view(-1)  # count rows, all real: padding is never active
        self.rows = keep if self.rows is None else self.rows.index_select(0, keep)
        if size > count:
            keep = torch.cat((keep, keep[:1].expand(size - count)))
        self.state = [t.index_select(0, keep) for t in self.state]
        self.data = [t.index_select(0, keep) for t in self.data]
        self.active = self.active.index_select(0, keep)
        self.active[count:] = False
        return True


def solve_level(level: _Level, u1: torch.Tensor, u2: torch.Tensor, p: dict, sync_every: int,
                path: str = "eager", graphs: ChunkGraphs | None = None, work: Work | None = None):
    """All warps at one level (OpenCV's procOneScale); u1, u2: [B, H, W] updated and returned.
    graphs: run the chunks as CUDA graphs (the bucketed fast path only: its few working shapes);
    work: counts the inner iterations run."""
    run = kernels(path)
    chunk = graphs if graphs is not None and run.bucketed else run_chunk
    h, w = u1.shape[-2:]
    consts = (p["lambda"] * p["theta"], p["theta"], p["tau"] / p["theta"])
    threshold = run.threshold(p["epsilon"] ** 2 * h * w, u1.device)
    state = [u1, u2, *(torch.zeros_like(u1) for _ in range(4))]  # p reset per level, not per warp
    for _ in range(p["warps"]):
        u1, u2 = state[:2]
        i1w, i1wx, i1wy = run.warp(level.i1_stack, u1, u2).unbind(dim=1)
        # contiguous, as the static copies a chunk's capture makes of them: the compiled chunk
        # guards on strides, and a second variant would be compiled inside the capture
        i1wx, i1wy = i1wx.contiguous(), i1wy.contiguous()
        rho_c = i1w - i1wx * u1 - i1wy * u2 - level.i0
        warp = _Warp(state, [i1wx, i1wy, i1wx * i1wx + i1wy * i1wy, rho_c], run)
        for outer in range(p["outer_iterations"]):
            # Host reads of `active`: here and between chunks of sync_every inner iterations.
            if outer > 0 and not warp.running():
                break
            if p["median_filtering"] > 1:
                warp.state[0], warp.state[1] = run.median(warp.state[0], warp.state[1], warp.active,
                                                          p["median_filtering"])
            done = 0
            while done < p["inner_iterations"]:
                n = min(sync_every, p["inner_iterations"] - done)
                *warp.state, warp.active = chunk(run.iterate(n), [*warp.state, warp.active], [*warp.data, threshold],
                                                 consts)
                if work is not None:
                    work.pixel_iterations += n * warp.state[0].numel()
                done += n
                if done < p["inner_iterations"] and not warp.running():
                    break
        state = warp.store()
    return state[0], state[1]


def tvl1_pairs(frames: torch.Tensor, p: dict, sync_every: int = 10, path: str = "eager",
               first: torch.Tensor | None = None, graphs: ChunkGraphs | None = None,
               work: Work | None = None) -> torch.Tensor:
    """frames: [N, H, W] float (0..255) -> flow [P, 2, H, W] (x, y) from frame i to i + 1 for
    each i of `first` ([P] long; default every i < N - 1).

    The pyramid is built once per frame; pair i takes levels of frames i and i + 1. With `first`
    the frames may hold several videos back to back: only pairs inside one video are named."""
    n, h, w = frames.shape
    if path != "eager" and (n == 2 if first is None else len(first) == 1):  # see flow_kernels: no batch of one
        pair = torch.zeros(2, dtype=torch.long, device=frames.device) + (0 if first is None else first[0])
        return tvl1_pairs(frames, p, sync_every, path, first=pair, graphs=graphs, work=work)[:1]
    if graphs is not None:
        graphs.begin()
    sizes = pyramid_sizes(h, w, p["nscales"], p["scale_step"])
    levels = [frames]
    inv = 1.0 / p["scale_step"]
    for size in sizes[1:]:
        levels.append(resize_linear(levels[-1], size, (inv, inv)))
    pairs = n - 1 if first is None else len(first)
    u1 = u2 = None
    for k in range(len(sizes) - 1, -1, -1):
        lh, lw = sizes[k]
        if u1 is None:
            u1 = frames.new_zeros(pairs, lh, lw)
            u2 = frames.new_zeros(pairs, lh, lw)
        else:
            # OpenCV passes the destination size here, so the step is src / dst.
            step = (u1.shape[-2] / lh, u1.shape[-1] / lw)
            u1 = resize_linear(u1, (lh, lw), step) * inv
            u2 = resize_linear(u2, (lh, lw), step) * inv
        if first is None:
            level = _Level(levels[k][:-1], levels[k][1:])
        else:
            level = _Level(levels[k].index_select(0, first), levels[k].index_select(0, first + 1))
        u1, u2 = solve_level(level, u1, u2, p, sync_every, path, graphs, work)
    return torch.stack((u1, u2), dim=1)


class TorchTVL1:
    """`tvl1-torch`: OpenCV's DualTVL1 (default parameters) in PyTorch, `batch` pairs per call.

    device: "cpu" or "cuda[:i]"; batch: frame pairs solved together, default 4 on the CPU (the
    working set stays in cache: 1.25x faster than 8 at 240x320) and 64 on a GPU (about 10 MB per
    pair at 240x320); sync_every: inner iterations per chunk, between host reads of the
    convergence flags; path: "eager" (the reference) or "compiled" (the fused fast path,
    preprocess/flow_kernels.py; on the CPU 1.1x eager at 240x320 on one thread, after a compile per process),
    default compiled on CUDA (eager on GPUs older than Volta, which Triton does not support), eager
    on the CPU; graphs: run the fast path's chunks of inner
    iterations as CUDA graphs (default: on CUDA with path compiled; preprocess/flow_kernels.py
    ChunkGraphs); threads: torch CPU threads of this process, set on the first CPU
    `compute` (1, like opencv-tvl1: preprocessing runs one worker per core; None leaves torch's
    setting); other keywords override OpenCV's DualTVL1 defaults (DEFAULTS).

    The constructor touches no device: preprocessing may build one in the parent to read
    `params()` and then fork workers, and a CUDA context does not survive a fork. The device
    is set up on the first `compute`."""

    name = "tvl1-torch"

    def __init__(self, device: str = "cpu", batch: int | None = None, sync_every: int = 10,
                 path: str | None = None, threads: int | None = 1, graphs: bool | None = None, **tvl1):
        unknown = sorted(set(tvl1) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown TV-L1 parameter(s) {unknown}; choose from {sorted(DEFAULTS)}")
        self._params = {**DEFAULTS, **tvl1}
        if self._params["gamma"] != 0:
            raise ValueError("tvl1-torch implements gamma = 0 only (OpenCV's default); "
                             "use the opencv-tvl1 backend for the illumination term")
        if self._params["median_filtering"] not in (0, 1, 3, 5):
            raise ValueError("median_filtering must be 0 or 1 (off), 3 or 5, as cv::medianBlur on float allows")
        self._device = torch.device(device)  # parsing only; no CUDA call
        if self._device.type not in ("cpu", "cuda"):
            raise ValueError(f"--flow-device must be cpu or cuda, got {device!r}")
        self.batch = int(batch) if batch is not None else (4 if self._device.type == "cpu" else 64)
        if self.batch < 1 or sync_every < 1:
            raise ValueError(f"--flow-batch ({batch}) and sync_every ({sync_every}) must be >= 1")
        self.sync_every = int(sync_every)
        self._chosen_path = path  # None: the default, which a GPU too old for inductor turns to eager
        self.path = path or default_path(self._device)
        if self.path not in PATHS:
            raise ValueError(f"tvl1-torch path must be one of {PATHS}, got {path!r}")
        self.threads = threads
        if graphs is None:
            graphs = self._device.type == "cuda" and self.path == "compiled"
        if graphs and (self._device.type != "cuda" or self.path != "compiled"):
            raise ValueError("tvl1-torch runs CUDA graphs on a CUDA device with path=compiled only, "
                             f"not on {device} with path={self.path}")
        self.graphs: ChunkGraphs | None = ChunkGraphs() if graphs else None  # no CUDA call until a capture
        self.work = Work()  # what this backend has solved so far (benchmarks/flow_speed.py reads it)

    @property
    def device(self) -> torch.device:
        return self._device

    def params(self) -> dict:
        """The algorithm's settings. Device and batch size change the result only by float
        rounding (each pair is solved independently), so they are not recorded."""
        return {**self._params, "implementation": "torch", "torch": torch.__version__.split("+")[0]}

    def _setup(self) -> None:
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--flow-device cuda but torch sees no CUDA device; use --flow-device cpu")
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)  # compiled kernels and the allocator follow the data's GPU
        too_old = inductor_unsupported(self._device) if self.path == "compiled" else None
        if too_old and self._chosen_path is not None:
            raise ValueError(f"tvl1-torch path=compiled needs a GPU of compute capability 7.0 or newer (Triton); "
                             f"this one is {too_old}: leave the path to its default (eager there)")
        if too_old:
            self.path, self.graphs = "eager", None
        if self._device.type == "cpu" and self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # small tensors: more threads mostly wait on each other

    @torch.no_grad()
    def compute(self, gray: np.ndarray) -> np.ndarray:
        """gray: [N, H, W] uint8 frames of one video -> [N - 1, H, W, 2] float32 flow in pixels."""
        _check_gray(gray)
        n, h, w = gray.shape
        out = np.zeros((max(n - 1, 0), h, w, 2), dtype=np.float32)
        if n < 2:
            return out
        self._setup()
        # Upload the whole video once; chunks of pairs overlap by one frame on the device.
        frames = torch.from_numpy(np.ascontiguousarray(gray)).to(self._device).float()
        for start in range(0, n - 1, self.batch):
            stop = min(start + self.batch, n - 1)
            flow = tvl1_pairs(frames[start:stop + 1], self._params, self.sync_every, self.path, graphs=self.graphs,
                              work=self.work)
            out[start:stop] = flow.permute(0, 2, 3, 1).cpu().numpy()
        self.work.pairs += n - 1
        return out

    @torch.no_grad()
    def compute_pairs(self, gray: np.ndarray, first: np.ndarray) -> np.ndarray:
        """One batch of pairs from any videos: gray [N, H, W] uint8 (videos back to back), first
        [P] indices i of the pairs (i, i + 1) -> [P, H, W, 2] float32 flow. Each pair's flow is
        bitwise what `compute` gives it on the CPU's eager path (pairs are solved independently)."""
        _check_gray(gray)
        self._setup()
        frames = torch.from_numpy(np.ascontiguousarray(gray)).to(self._device).float()
        index = torch.from_numpy(np.asarray(first, dtype=np.int64)).to(self._device)
        flow = tvl1_pairs(frames, self._params, self.sync_every, self.path, first=index, graphs=self.graphs,
                          work=self.work)
        self.work.pairs += len(first)
        return flow.permute(0, 2, 3, 1).cpu().numpy()


def _check_gray(gray: np.ndarray) -> None:
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise ValueError(f"tvl1-torch takes [N, H, W] uint8 grey frames, got {gray.dtype} {gray.shape}")
