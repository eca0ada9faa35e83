"""The steps of OpenCV contrib's CPU DualTVL1 as batched PyTorch ops, [B, H, W] per plane.

tvl1-torch's numerics (the solver that runs them is preprocess/flow_torch.py, the fused fast
path preprocess/flow_kernels.py). Each function reproduces one OpenCV step, float for float
where the order of operations allows:

* pyramid: each level is `cv::resize(previous, fx=fy=scale_step, INTER_LINEAR)` (half-pixel
  centres, output size rounded), stopping before a level narrower or shorter than 16 px;
* the gradient of the second frame by centred differences, halved one-sided on the border;
* the warp: bicubic interpolation (A = -0.75) with zero outside the image (`cv::remap(INTER_CUBIC)`
  with its default constant border; OpenCV 5.0 samples at the float coordinates as given);
* the 5x5 median (replicated border) of u, as cv::medianBlur on float;
* one inner iteration: the thresholding step (v), u = v + theta div p, and the dual step
  p = (p + tau/theta grad u) / (1 + tau/theta |grad u|) with forward differences and the
  matching backward divergence; a pair stops once sum |u_new - u_old|^2 <= epsilon^2 * area.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

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


@functools.lru_cache(maxsize=256)
def _device_taps(src: int, dst: int, scale: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The taps of one axis on `device`, uploaded once per (size, scale, device): a pyramid has
    a handful of distinct resizes, and a per-call upload is a blocking host->device copy."""
    return tuple(torch.from_numpy(a).to(device) for a in _linear_taps(src, dst, scale))


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """x: [..., H, W] -> [..., h, w] as cv::resize INTER_LINEAR; `scale` is the source step per
    destination pixel (y, x): 1/fy when OpenCV got fx/fy, src/dst when it got a size."""
    (h, w), (sy, sx) = size, scale
    x0, x1, fx = _device_taps(x.shape[-1], w, float(sx), x.device)
    y0, y1, fy = _device_taps(x.shape[-2], h, float(sy), x.device)
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


def tvl1_iteration(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active,
                   l_t: float, theta: float, taut: float, threshold, accumulate: torch.dtype = torch.float32):
    """One inner iteration of OpenCV's procOneScale for the pairs still `active`.

    All tensors [B, H, W] except active [B, 1, 1] bool. Returns the new (u1, u2, p11, p12, p21,
    p22, active): inactive pairs keep their state; a pair turns inactive once its update
    sum |du|^2 (summed in `accumulate`) falls to `threshold` (a float or a 0-d tensor), after
    this iteration's dual step, as in OpenCV's loop."""
    # Thresholding step: v = u + step * grad(I1w), the step chosen by where rho falls.
    rho = rho_c + (i1wx * u1 + i1wy * u2)
    lt_grad = l_t * grad
    step = torch.where(rho < -lt_grad, l_t, torch.where(
        rho > lt_grad, -l_t, torch.where(grad > _FLT_EPSILON, -rho / grad.clamp_min(_FLT_EPSILON), 0.0)))
    new_u1 = u1 + step * i1wx + theta * divergence(p11, p12)
    new_u2 = u2 + step * i1wy + theta * divergence(p21, p22)
    error = ((new_u1 - u1) ** 2 + (new_u2 - u2) ** 2).sum(dim=(1, 2), keepdim=True, dtype=accumulate)
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

