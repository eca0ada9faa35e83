"""Batched TV-L1 optical flow in PyTorch, step for step as OpenCV contrib's CPU DualTVL1.

The `tvl1-torch` preprocessing backend. It runs the duality-based TV-L1 scheme of Zach, Pock and
Bischof (2007) in the form of Sanchez, Meinhardt-Llopis and Facciolo (IPOL 2013) exactly as
`cv::optflow::DualTVL1OpticalFlow` runs it on the CPU, on many frame pairs at once (fp32):

* frames are u8 converted to float without rescaling (0..255);
* pyramid: each level is `cv::resize(previous, fx=fy=scale_step, INTER_LINEAR)` (half-pixel
  centres, output size rounded), stopping before a level narrower or shorter than 16 px;
* per level, the gradient of the second frame by centred differences, halved one-sided
  differences on the border; dual variables p reset to zero once per level, not per warp;
* per warp, the second frame and its gradient are sampled at x + u by bicubic interpolation
  (A = -0.75) with zero outside the image (`cv::remap(INTER_CUBIC)` with its default constant
  border; OpenCV 5.0 samples at the float coordinates as given, no 1/32 px rounding: measured);
* per outer iteration, a 5x5 median (replicated border) of u; per inner iteration the
  thresholding step (v), u = v + theta div p, and the dual step p = (p + tau/theta grad u) /
  (1 + tau/theta |grad u|) with forward differences and the matching backward divergence;
* a warp stops when sum |u_new - u_old|^2 over the level <= epsilon^2 * area;
* between levels the flow is resized (INTER_LINEAR) to the finer size and multiplied by
  1 / scale_step.

Convergence without host synchronisation: every pair carries an `active` flag on the device.
Each inner iteration computes all working pairs, then keeps the new u and p only where the pair
was still active (`torch.where`) and clears the flag of pairs whose update norm fell below the
threshold, so each pair stops at the iteration where OpenCV's loop would stop it. The host reads
the flags (`active.sum()`, one synchronisation) only every `sync_every` inner iterations and at
each outer iteration; there it drops the converged pairs from the working tensors (their state
is written back to the batch) and ends the warp once none is left.

How close to OpenCV: with the stopping rule off (epsilon 0) the two agree to ~1e-4 px. With it
on, float rounding can move a pair's stop by an iteration (and so past or before a median pass);
that leaves 0.01-0.03 px mean difference on the test videos, no more than OpenCV's own output
moves (0.02-0.03 px) when one pixel of each frame changes by one grey level
(tests/test_flow_torch.py holds the agreement bounds).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

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
_MIN_LEVEL_SIDE = 16  # OpenCV stops the pyramid before a level smaller than this
_FLT_EPSILON = float(np.finfo(np.float32).eps)


def _linear_taps(src: int, dst: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv::resize INTER_LINEAR along one axis: source indices (i0, i1) and float weight of i1."""
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(np.float32)
    clamp = (i0 < 0) | (i0 >= src - 1)  # OpenCV drops the weight at both ends
    frac[clamp] = 0.0
    i0 = np.clip(i0, 0, src - 1)
    return i0, np.minimum(i0 + 1, src - 1), frac


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """x: [..., H, W] -> [..., h, w] as cv::resize INTER_LINEAR; `scale` is the source step per
    destination pixel (y, x): 1/fy when OpenCV got fx/fy, src/dst when it got a size."""
    (h, w), (sy, sx) = size, scale
    taps = []
    for src, dst, step in ((x.shape[-1], w, sx), (x.shape[-2], h, sy)):
        i0, i1, frac = _linear_taps(src, dst, step)
        taps.append((torch.from_numpy(i0).to(x.device), torch.from_numpy(i1).to(x.device),
                     torch.from_numpy(frac).to(x.device)))
    (x0, x1, fx), (y0, y1, fy) = taps
    # Horizontal pass, then vertical, in OpenCV's order (the float rounding then agrees).
    rows = x.index_select(-1, x0) * (1 - fx) + x.index_select(-1, x1) * fx
    fy = fy[:, None]
    return rows.index_select(-2, y0) * (1 - fy) + rows.index_select(-2, y1) * fy


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """Level sizes, finest first, as OpenCV rounds them (`saturate_cast<int>(side * fx)`)."""
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = sizes[-1]
        nxt = (int(np.rint(h * scale_step)), int(np.rint(w * scale_step)))
        if nxt[0] < _MIN_LEVEL_SIDE or nxt[1] < _MIN_LEVEL_SIDE:
            break
        sizes.append(nxt)
    return sizes


def centred_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, H, W] -> (d/dx, d/dy); the replicated border turns the border rows and columns
    into OpenCV's halved one-sided differences."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]), 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u: [B, H, W] -> forward differences, zero in the last column (x) and last row (y)."""
    return F.pad(u[..., 1:] - u[..., :-1], (0, 1)), F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))


def divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence, the negative adjoint of `forward_gradient`: [B, H, W]."""
    return (px - F.pad(px[..., :-1], (1, 0))) + (py - F.pad(py[..., :-1, :], (0, 0, 1, 0)))


def _merge_exchange(n: int) -> list[tuple[int, int]]:
    """Batcher's merge-exchange sorting network for n wires (Knuth, TAOCP 5.2.2, Algorithm M)."""
    pairs = []
    t = (n - 1).bit_length()
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while d > 0:
            pairs += [(i, i + d) for i in range(n - d) if (i & p) == r]
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return pairs


def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of the sorting network that the middle output depends on, each with
    whether its min and its max are used later: (a, b, keep_min, keep_max)."""
    needed, kept = {n // 2}, []
    for a, b in reversed(_merge_exchange(n)):
        if a in needed or b in needed:
            kept.append((a, b, a in needed, b in needed))
            needed |= {a, b}
    return tuple(reversed(kept))


_MEDIAN_NETWORKS = {k * k: _median_network(k * k) for k in (3, 5)}  # the sizes cv::medianBlur takes on float


def median_blur(u: torch.Tensor, ksize: int) -> torch.Tensor:
    """u: [B, H, W] -> ksize x ksize median with replicated border, as cv::medianBlur on float.

    A pruned sorting network over the ksize^2 shifted views (~200 min/max for 5x5): elementwise
    ops that run at memory speed on any device, unlike sorting an unfolded [B, 25, H*W] copy
    (8x slower on CPU)."""
    r = ksize // 2
    _, h, w = u.shape
    padded = F.pad(u[:, None], (r, r, r, r), mode="replicate")[:, 0]
    wires = [padded[:, dy:dy + h, dx:dx + w] for dy in range(ksize) for dx in range(ksize)]
    for a, b, keep_min, keep_max in _MEDIAN_NETWORKS[ksize * ksize]:
        lo = torch.minimum(wires[a], wires[b]) if keep_min else None
        hi = torch.maximum(wires[a], wires[b]) if keep_max else None
        wires[a], wires[b] = lo, hi
    return wires[len(wires) // 2]


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic convolution weights (A = -0.75, OpenCV's interpolateCubic) for the four taps
    at offsets -1, 0, 1, 2 from floor(x), t = x - floor(x)."""
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return [w0, w1, w2, 1 - w0 - w1 - w2]


def warp_bicubic(images: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """images: [B, C, H, W] sampled at (x + u1, y + u2) ([B, H, W] each) -> [B, C, H, W].

    cv::remap(INTER_CUBIC) with its default constant-zero border: taps outside the image count
    as 0. The coordinates are used as is (OpenCV 5 no longer rounds them to 1/32 px);
    F.grid_sample would normalise and unnormalise them, which costs ~1e-5 px of position."""
    b, c, h, w = images.shape
    xs = torch.arange(w, device=u1.device, dtype=u1.dtype)
    ys = torch.arange(h, device=u1.device, dtype=u1.dtype)[:, None]
    mx, my = xs + u1, ys + u2
    fx, fy = torch.floor(mx), torch.floor(my)
    wx, wy = _cubic_weights(mx - fx), _cubic_weights(my - fy)
    # One zero ring around the image; every tap outside is clamped onto it and reads 0.
    flat = F.pad(images, (1, 1, 1, 1)).flatten(2)  # [B, C, (H + 2) * (W + 2)]
    x0, y0 = fx.long(), fy.long()  # tap j sits at floor + j - 1, i.e. padded index floor + j
    cols = [(x0 + j).clamp(0, w + 1) for j in range(4)]
    rows = [(y0 + i).clamp(0, h + 1) * (w + 2) for i in range(4)]
    out = torch.zeros_like(images)
    for i in range(4):
        row = torch.zeros_like(images)
        for j in range(4):
            index = (rows[i] + cols[j]).view(b, 1, h * w).expand(b, c, h * w)
            row += flat.gather(2, index).view(b, c, h, w) * wx[j][:, None]
        out += row * wy[i][:, None]
    return out


class _Level:
    """One pyramid level of a batch of pairs: frames I0, I1 and I1's gradient, [B, H, W] each."""

    def __init__(self, i0: torch.Tensor, i1: torch.Tensor):
        self.i0 = i0
        self.i1_stack = torch.stack((i1, *centred_gradient(i1)), dim=1)  # [B, 3, H, W]


def tvl1_iteration(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active,
                   l_t: float, theta: float, taut: float, threshold: float):
    """One inner iteration of OpenCV's procOneScale for the pairs still `active`.

    All tensors [B, H, W] except active [B, 1, 1] bool. Returns the new (u1, u2, p11, p12, p21,
    p22, active): inactive pairs keep their state; a pair turns inactive once its update
    sum |du|^2 falls to `threshold`, after this iteration's dual step, as in OpenCV's loop."""
    # Thresholding step: v = u + step * grad(I1w), the step chosen by where rho falls.
    rho = rho_c + (i1wx * u1 + i1wy * u2)
    lt_grad = l_t * grad
    step = torch.where(rho < -lt_grad, l_t, torch.where(
        rho > lt_grad, -l_t, torch.where(grad > _FLT_EPSILON, -rho / grad.clamp_min(_FLT_EPSILON), 0.0)))
    new_u1 = u1 + step * i1wx + theta * divergence(p11, p12)
    new_u2 = u2 + step * i1wy + theta * divergence(p21, p22)
    error = ((new_u1 - u1) ** 2 + (new_u2 - u2) ** 2).sum(dim=(1, 2), keepdim=True)
    u1 = torch.where(active, new_u1, u1)
    u2 = torch.where(active, new_u2, u2)
    u1x, u1y = forward_gradient(u1)
    u2x, u2y = forward_gradient(u2)
    ng1 = 1.0 + taut * torch.hypot(u1x, u1y)
    ng2 = 1.0 + taut * torch.hypot(u2x, u2y)
    p11 = torch.where(active, (p11 + taut * u1x) / ng1, p11)
    p12 = torch.where(active, (p12 + taut * u1y) / ng1, p12)
    p21 = torch.where(active, (p21 + taut * u2x) / ng2, p21)
    p22 = torch.where(active, (p22 + taut * u2y) / ng2, p22)
    return u1, u2, p11, p12, p21, p22, active & (error > threshold)


@functools.lru_cache(maxsize=None)
def _kernels(compiled: bool) -> tuple:
    """(iteration, median) functions; with `compiled`, fused by torch.compile (inductor), which
    turns ~70 elementwise launches per iteration and ~200 per median into a few kernels."""
    if not compiled:
        return tvl1_iteration, median_blur
    return (torch.compile(tvl1_iteration, dynamic=True),
            torch.compile(median_blur, dynamic=True))


class _Warp:
    """The pairs still iterating in one warp, and every pair's state.

    Between host reads, converged pairs are frozen by the `active` mask; at each read they are
    dropped from the working tensors, so the rest of the warp costs only the pairs still running
    (a batch otherwise runs as long as its slowest pair)."""

    def __init__(self, state: list[torch.Tensor], data: list[torch.Tensor]):
        self.full = state  # every pair: u1, u2, p11, p12, p21, p22, [B, H, W] each
        self.state, self.data = list(state), data  # working pairs; data: I1wx, I1wy, grad, rho_c
        self.rows = None  # full-batch row of each working pair; None while all are working
        self.active = torch.ones(len(state[0]), 1, 1, dtype=torch.bool, device=state[0].device)

    def store(self) -> list[torch.Tensor]:
        """Write the working pairs' state back into the full batch and return it."""
        if self.rows is None:
            self.full = list(self.state)
        else:
            for full, work in zip(self.full, self.state):
                full.index_copy_(0, self.rows, work)
        return self.full

    def running(self) -> bool:
        """One host synchronisation: drop the converged pairs; False once none is left."""
        count = int(self.active.sum())
        if count == len(self.active):
            return True
        self.store()
        if count == 0:
            return False
        keep = self.active.view(-1).nonzero().view(-1)
        self.rows = keep if self.rows is None else self.rows.index_select(0, keep)
        self.state = [t.index_select(0, keep) for t in self.state]
        self.data = [t.index_select(0, keep) for t in self.data]
        self.active = self.active.index_select(0, keep)
        return True


def solve_level(level: _Level, u1: torch.Tensor, u2: torch.Tensor, p: dict, sync_every: int,
                compiled: bool = False):
    """All warps at one level (OpenCV's procOneScale); u1, u2: [B, H, W] updated and returned."""
    iteration, median = _kernels(compiled)
    h, w = u1.shape[-2:]
    consts = (p["lambda"] * p["theta"], p["theta"], p["tau"] / p["theta"], p["epsilon"] ** 2 * h * w)
    state = [u1, u2, *(torch.zeros_like(u1) for _ in range(4))]  # p reset per level, not per warp
    for _ in range(p["warps"]):
        u1, u2 = state[:2]
        i1w, i1wx, i1wy = warp_bicubic(level.i1_stack, u1, u2).unbind(dim=1)
        rho_c = i1w - i1wx * u1 - i1wy * u2 - level.i0
        warp = _Warp(state, [i1wx, i1wy, i1wx * i1wx + i1wy * i1wy, rho_c])
        for outer in range(p["outer_iterations"]):
            # Host reads of `active`: here and every sync_every inner iterations, never per step.
            if outer > 0 and not warp.running():
                break
            if p["median_filtering"] > 1:
                for c in (0, 1):
                    warp.state[c] = torch.where(warp.active, median(warp.state[c], p["median_filtering"]),
                                                warp.state[c])
            for inner in range(p["inner_iterations"]):
                *warp.state, warp.active = iteration(*warp.state, *warp.data, warp.active, *consts)
                if (inner + 1) % sync_every == 0 and not warp.running():
                    break
        state = warp.store()
    return state[0], state[1]


def tvl1_pairs(frames: torch.Tensor, p: dict, sync_every: int = 10, compiled: bool = False) -> torch.Tensor:
    """frames: [N, H, W] float (0..255) -> flow [N - 1, 2, H, W] (x, y) from frame i to i + 1.

    The pyramid is built once per frame; pair i takes levels of frames i and i + 1."""
    n, h, w = frames.shape
    sizes = pyramid_sizes(h, w, p["nscales"], p["scale_step"])
    levels = [frames]
    inv = 1.0 / p["scale_step"]
    for size in sizes[1:]:
        levels.append(resize_linear(levels[-1], size, (inv, inv)))
    u1 = u2 = None
    for k in range(len(sizes) - 1, -1, -1):
        lh, lw = sizes[k]
        if u1 is None:
            u1 = frames.new_zeros(n - 1, lh, lw)
            u2 = frames.new_zeros(n - 1, lh, lw)
        else:
            # OpenCV passes the destination size here, so the step is src / dst.
            step = (u1.shape[-2] / lh, u1.shape[-1] / lw)
            u1 = resize_linear(u1, (lh, lw), step) * inv
            u2 = resize_linear(u2, (lh, lw), step) * inv
        level = _Level(levels[k][:-1], levels[k][1:])
        u1, u2 = solve_level(level, u1, u2, p, sync_every, compiled)
    return torch.stack((u1, u2), dim=1)


class TorchTVL1:
    """`tvl1-torch`: OpenCV's DualTVL1 (default parameters) in PyTorch, `batch` pairs per call.

    device: "cpu" or "cuda[:i]"; batch: frame pairs solved together (about 10 MB per pair at
    240x320); sync_every: inner iterations between host reads of the convergence flags;
    compile: fuse the iteration and the median with torch.compile (about 2x on CPU; a warm-up of
    about a minute per process); threads: torch CPU threads of this process, set on the first CPU
    `compute` (1, like opencv-tvl1: preprocessing runs one worker per core; None leaves torch's
    setting); other keywords override OpenCV's DualTVL1 defaults (DEFAULTS).

    The constructor touches no device: preprocessing may build one in the parent to read
    `params()` and then fork workers, and a CUDA context does not survive a fork. The device
    is set up on the first `compute`."""

    name = "tvl1-torch"

    def __init__(self, device: str = "cpu", batch: int = 32, sync_every: int = 10,
                 compile: bool = False, threads: int | None = 1, **tvl1):
        unknown = sorted(set(tvl1) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown TV-L1 parameter(s) {unknown}; choose from {sorted(DEFAULTS)}")
        self._params = {**DEFAULTS, **tvl1}
        if self._params["gamma"] != 0:
            raise ValueError("tvl1-torch implements gamma = 0 only (OpenCV's default); "
                             "use the opencv-tvl1 backend for the illumination term")
        if self._params["median_filtering"] not in (0, 1, 3, 5):
            raise ValueError("median_filtering must be 0 or 1 (off), 3 or 5, as cv::medianBlur on float allows")
        if batch < 1 or sync_every < 1:
            raise ValueError(f"batch ({batch}) and sync_every ({sync_every}) must be >= 1")
        self._device = torch.device(device)  # parsing only; no CUDA call
        if self._device.type not in ("cpu", "cuda"):
            raise ValueError(f"--flow-device must be cpu or cuda, got {device!r}")
        self.batch = int(batch)
        self.sync_every = int(sync_every)
        self.compile = bool(compile)
        self.threads = threads

    def params(self) -> dict:
        """The algorithm's settings. Device and batch size change the result only by float
        rounding (each pair is solved independently), so they are not recorded."""
        return {**self._params, "implementation": "torch", "torch": torch.__version__.split("+")[0]}

    @torch.no_grad()
    def compute(self, gray: np.ndarray) -> np.ndarray:
        """gray: [N, H, W] uint8 frames of one video -> [N - 1, H, W, 2] float32 flow in pixels."""
        if gray.ndim != 3 or gray.dtype != np.uint8:
            raise ValueError(f"tvl1-torch takes [N, H, W] uint8 grey frames, got {gray.dtype} {gray.shape}")
        n, h, w = gray.shape
        out = np.zeros((max(n - 1, 0), h, w, 2), dtype=np.float32)
        if n < 2:
            return out
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--flow-device cuda but torch sees no CUDA device; use --flow-device cpu")
        if self._device.type == "cpu" and self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # small tensors: more threads mostly wait on each other
        # Upload the whole video once; chunks of pairs overlap by one frame on the device.
        frames = torch.from_numpy(np.ascontiguousarray(gray)).to(self._device).float()
        for start in range(0, n - 1, self.batch):
            stop = min(start + self.batch, n - 1)
            flow = tvl1_pairs(frames[start:stop + 1], self._params, self.sync_every, self.compile)
            out[start:stop] = flow.permute(0, 2, 3, 1).cpu().numpy()
        return out
