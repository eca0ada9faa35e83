"""The loader tests' toy videos: every frame of a moving video is the pattern translated by one more
pixel (frames are crops of one wide canvas, which must equal patterns drawn one by one)."""

import cv2
import numpy as np

from dali_pipelines.toy_shards import pattern, toy_video


def test_canvas_crops_equal_shifted_patterns():
    height, width, frames = 12, 20, 7
    canvas = pattern(height, width, 0.0, seed=5, extra=frames - 1)
    assert canvas.shape == (height, width + frames - 1, 3)
    for i in range(frames):
        crop = canvas[:, frames - 1 - i : frames - 1 - i + width]
        assert np.array_equal(crop, pattern(height, width, float(i), seed=5))
    assert not np.array_equal(pattern(height, width, 1.0, seed=5), pattern(height, width, 0.0, seed=5))


def test_moving_video_translates_and_static_video_does_not():
    def decoded(kind):
        video = toy_video("v", 0, 5, 16, 24, kind, seed=2, with_flow=False, quality=100)
        return [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).astype(int) for b in video.rgb]

    moving, static = decoded("moving"), decoded("static")
    # frame i+1 is frame i moved one pixel right (JPEG at quality 100 keeps it within a few levels)
    assert np.abs(moving[1][:, 1:] - moving[0][:, :-1]).mean() < 2 < np.abs(moving[1] - moving[0]).mean()
    assert all(np.array_equal(f, static[0]) for f in static)
