"""Decoding one source video with OpenCV into frames, the first step of packing (docs/design.md, Storage).

Frames stay BGR uint8 as OpenCV returns them: `cv2.imencode` writes a correct colour JPEG from
BGR, so nothing is converted twice. Every way a file can be unusable (missing, empty, not a
video, no decodable frame, frames of changing size) raises `VideoDecodeError` with the path and
the reason; the packer records that as a `FailedVideo` and goes on with the next video.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np


class VideoDecodeError(RuntimeError):
    """A source video that cannot be decoded; the message says why (recorded in the manifest)."""


@dataclass
class DecodedVideo:
    """frames: [N, H, W, 3] BGR uint8; fps: frames per second as the container states it (0.0 = unknown)."""

    frames: np.ndarray
    fps: float


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `short_side`, aspect kept (None = unchanged)."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_short_side(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    """[H, W, C] -> the frame with its shorter side scaled to `short_side` (INTER_AREA when shrinking)."""
    h, w = frame.shape[:2]
    new_h, new_w = resized_shape(h, w, short_side)
    if (new_h, new_w) == (h, w):
        return frame
    interp = cv2.INTER_AREA if new_h < h else cv2.INTER_LINEAR
    return cv2.resize(frame, (new_w, new_h), interpolation=interp)


def _open(path: Path) -> tuple[cv2.VideoCapture, float]:
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: the file is empty (0 bytes)")
    open(path, "rb").close()  # unreadable (permissions): a PermissionError naming it, which OpenCV would hide
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoDecodeError(f"{path}: OpenCV cannot open it as a video (corrupt or unsupported container)")
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    return capture, fps if math.isfinite(fps) and fps > 0 else 0.0


def open_video(path: str | os.PathLike, short_side: int | None = None) -> tuple[float, Iterator[np.ndarray]]:
    """Open a video once: (the frame rate the container states, 0.0 when it states none; its frames
    as `iter_frames` yields them). Raises VideoDecodeError at once when the file does not open."""
    path = Path(path)
    capture, fps = _open(path)
    return fps, _frames(capture, path, short_side, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))


def iter_frames(path: str | os.PathLike, short_side: int | None = None) -> Iterator[np.ndarray]:
    """Yield the frames of a video one by one, [H, W, 3] BGR uint8, optionally short-side resized.

    Streaming keeps a worker's memory at one frame plus what the caller keeps (a UCF101 video can
    hold 1,800 frames). Raises VideoDecodeError when nothing decodes or the frame size changes.
    """
    yield from open_video(path, short_side)[1]


# fewer decoded frames than this share of the count the container states: a truncated or damaged
# file (a stated count is an estimate in some containers, hence the margin)
MIN_DECODED_SHARE = 0.9


def _frames(capture: cv2.VideoCapture, path: Path, short_side: int | None, stated: int) -> Iterator[np.ndarray]:
    count, shape = 0, None
    try:
        while True:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            if frame.ndim == 2:  # some codecs hand back grayscale
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            if shape is None:
                shape = frame.shape
            elif frame.shape != shape:
                raise VideoDecodeError(f"{path}: frame {count} is {frame.shape}, earlier frames were {shape}")
            count += 1
            yield resize_short_side(frame, short_side)
    finally:
        capture.release()
    if count == 0:
        raise VideoDecodeError(f"{path}: no frame could be decoded (zero frames or a corrupt stream)")
    if count < MIN_DECODED_SHARE * stated:
        raise VideoDecodeError(f"{path}: {count} of the {stated} frames its container states could be decoded; "
                               "the file is truncated or damaged: download or re-encode it")


def read_video(path: str | os.PathLike, short_side: int | None = None) -> DecodedVideo:
    """The whole video in memory: frames [N, H, W, 3] BGR uint8 and fps (for tests and benchmarks)."""
    fps, frames = open_video(path, short_side)
    return DecodedVideo(np.stack(list(frames)), fps)
