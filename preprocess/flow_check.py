"""Frame sequences with known optical flow, and the agreement measures between flow fields.

Used by tests/test_flow_torch.py and benchmarks/flow_speed.py to check a flow backend against
ground truth and against the OpenCV reference, before and after the u8 quantisation that the
shards store (docs/design.md, "Flow"). Stdlib + numpy + OpenCV only.
"""

from __future__ import annotations

import numpy as np

from preprocess.schema import quantise_flow

_PAD = 24  # canvas margin: every sample of a generated frame stays inside the texture


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 [H, W] image in 0..255 that looks like a video frame to a flow method:
    smooth noise at three scales (shading, fine detail) plus solid shapes (sharp edges)."""
    import cv2

    img = np.zeros((height, width), np.float32)
    for sigma, amplitude in ((8.0, 60.0), (2.5, 40.0), (0.8, 20.0)):
        noise = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma)
        img += amplitude * noise / max(float(noise.std()), 1e-6)
    img += 128.0
    for _ in range(max(4, height * width // 600)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        shade = float(rng.uniform(20, 235))
        size = int(rng.integers(3, max(4, min(height, width) // 5)))
        if rng.random() < 0.5:
            cv2.circle(img, centre, size, shade, -1, lineType=cv2.LINE_AA)
        else:
            corner = (centre[0] + size, centre[1] + int(rng.integers(2, size + 2)))
            cv2.rectangle(img, centre, corner, shade, -1, lineType=cv2.LINE_AA)
    return np.clip(img, 0, 255)


def smooth_flow(height: int, width: int, rng: np.random.Generator, magnitude: float = 2.5) -> np.ndarray:
    """A float32 [H, W, 2] flow field: translation, a little rotation and zoom, and a smooth
    wave, everywhere under ~`magnitude` * 1.6 px."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    shift = rng.uniform(-magnitude, magnitude, 2)
    angle, zoom = rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02)
    phase = rng.uniform(0, 2 * np.pi, 2)
    period = rng.uniform(0.5, 1.0) * max(height, width)
    u = shift[0] + zoom * (x - cx) - angle * (y - cy) + 0.4 * magnitude * np.sin(2 * np.pi * y / period + phase[0])
    v = shift[1] + zoom * (y - cy) + angle * (x - cx) + 0.4 * magnitude * np.cos(2 * np.pi * x / period + phase[1])
    return np.stack((u, v), axis=-1).astype(np.float32)


def synthetic_video(num_frames: int, height: int, width: int, seed: int = 0,
                    magnitude: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """-> (gray [N, H, W] uint8, flow [N - 1, H, W, 2] float32) with frame_i(p) =
    frame_{i+1}(p + flow_i(p)), the convention of OpenCV and preprocess.flow.

    Built backwards from the last frame: frame_i samples frame_{i+1} at p + flow_i(p) (bicubic,
    on a canvas larger than the crop so no sample falls outside)."""
    import cv2

    rng = np.random.default_rng(seed)
    ch, cw = height + 2 * _PAD, width + 2 * _PAD
    y, x = np.mgrid[0:ch, 0:cw].astype(np.float32)
    canvas = texture(ch, cw, rng)
    frames, flows = [canvas], []
    for _ in range(num_frames - 1):
        flow = smooth_flow(ch, cw, rng, magnitude)
        canvas = cv2.remap(canvas, x + flow[..., 0], y + flow[..., 1], cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
        frames.append(canvas)
        flows.append(flow)
    crop = (slice(_PAD, _PAD + height), slice(_PAD, _PAD + width))
    gray = np.stack([np.clip(np.rint(f[crop]), 0, 255).astype(np.uint8) for f in reversed(frames)])
    return gray, np.stack([f[crop] for f in reversed(flows)])


def end_point_error(flow: np.ndarray, reference: np.ndarray) -> float:
    """Mean Euclidean distance in pixels between two [..., 2] flow fields."""
    return float(np.linalg.norm(np.asarray(flow, np.float64) - reference, axis=-1).mean())


def quantised_agreement(flow: np.ndarray, reference: np.ndarray) -> dict:
    """Compare the stored u8 levels of two flows: mean |level difference| and the fraction of
    components more than one level apart (one level = 40/255 px)."""
    delta = np.abs(quantise_flow(flow).astype(np.int16) - quantise_flow(reference).astype(np.int16))
    return {"mean_level_delta": float(delta.mean()), "frac_over_one_level": float((delta > 1).mean())}
