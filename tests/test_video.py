"""Decoding source videos: frames, fps, short-side resize, and a clear error for bad files."""

import numpy as np
import pytest

from preprocess.synthetic import write_avi
from preprocess.video import VideoDecodeError, iter_frames, read_video, resized_shape


@pytest.fixture
def clip(tmp_path):
    ramp = np.add.outer(np.arange(32), np.arange(40))[None, :, :, None] * 3  # smooth: JPEG keeps it
    frames = np.clip(ramp + 20 * np.arange(6)[:, None, None, None], 0, 255).repeat(3, axis=3).astype(np.uint8)
    path = tmp_path / "clip.avi"
    write_avi(path, frames, fps=25.0)
    return path, frames


def test_read_video_returns_every_frame_and_fps(clip):
    path, frames = clip
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == 25.0
    # MJPG is lossy, but the decoded frames are the written ones up to JPEG error
    assert np.abs(video.frames.astype(int) - frames).mean() < 4


def test_short_side_resize_keeps_aspect(clip):
    path, _ = clip
    assert resized_shape(240, 320, 128) == (128, 171)
    assert resized_shape(240, 320, None) == (240, 320)
    assert next(iter_frames(path, short_side=16)).shape == (16, 20, 3)


@pytest.mark.parametrize("content, reason", [(None, "no such file"), (b"", "empty"), (b"RIFF" + bytes(range(256)) * 8, "cannot open|no frame")])
def test_bad_files_raise_a_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.avi"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=reason) as err:
        read_video(path)
    assert str(path) in str(err.value)


def test_a_truncated_file_that_still_decodes_some_frames_is_an_error(tmp_path):
    """Cut to 60% of its bytes, a 20-frame file decoded a few frames and was packed as a short video."""
    rng = np.random.default_rng(0)
    path = tmp_path / "cut.avi"
    write_avi(path, rng.integers(0, 256, (20, 32, 40, 3), dtype=np.uint8), fps=25.0)
    assert len(read_video(path).frames) == 20
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(VideoDecodeError, match=rf"{path}: \d+ of the 20 frames its container states could be "
                                               "decoded; the file is truncated or damaged"):
        read_video(path)
