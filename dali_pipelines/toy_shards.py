"""Tiny packed datasets for loader tests and `benchmarks/loader_speed.py`, written by the real shard
writer (`preprocess.shards.write_shard`) from synthetic frames.

Videos: "moving" (a smooth colour pattern translating right, so frames differ and flips show),
"static" (every frame identical: any per-frame difference after augmentation is a bug) and
optionally "short" ones (fewer frames than a clip, to exercise the front padding). Flow is the
pattern's true motion plus a horizontal ramp in x (so a flip that forgets to negate flow-x, or
flips the wrong axis, changes the numbers) and a vertical ramp in y.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from preprocess.flow import encode_flow
from preprocess.schema import Manifest, VideoRecord, manifest_path, shard_name, write_json_atomic
from preprocess.shards import EncodedVideo, shard_entry, write_shard


def pattern(height: int, width: int, shift: float, seed: int, extra: int = 0) -> np.ndarray:
    """Smooth RGB pattern [H, W + extra, 3] uint8, translated right by `shift` pixels; the `extra`
    columns continue it to the left (x = -extra .. -1), so a crop `[:, extra - s : extra - s + W]`
    is the pattern translated by `shift + s`, bit for bit."""
    rng = np.random.default_rng(seed)
    fy, fx, phase = rng.uniform(0.5, 2.0, 3), rng.uniform(0.5, 2.0, 3), rng.uniform(0, 6.3, 3)
    yy, xx = np.mgrid[0:height, -extra:width].astype(np.float64)
    xx = xx - shift
    chans = [127.5 + 100 * np.sin(2 * np.pi * (fx[c] * xx / width + fy[c] * yy / height) + phase[c]) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def toy_video(name: str, label: int, num_frames: int, height: int, width: int, kind: str, seed: int,
              with_flow: bool, quality: int = 95) -> EncodedVideo:
    speed = 0 if kind == "static" else 1  # whole pixels per frame: every frame is a crop of one canvas
    start = speed * (num_frames - 1)  # the last frame's shift: the canvas's extra columns
    canvas = pattern(height, width, 0.0, seed, extra=start)
    frames = [canvas[:, start - speed * i : start - speed * i + width] for i in range(num_frames)]
    rgb = [cv2.imencode(".jpg", f[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for f in frames]
    flow = None
    if with_flow:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        field = np.stack([speed + 10 * (xx / width - 0.5) + 0.5 * np.sin(yy / 3),
                          -5 + 10 * yy / height], -1)
        flow = encode_flow(np.repeat(field[None], num_frames - 1, 0), quality)
    group = f"{name.rsplit('_c', 1)[0]}"
    record = VideoRecord(name=name, class_name=f"class{label}", label=label, group=group,
                         num_frames=num_frames, fps=25.0, height=height, width=width)
    return EncodedVideo(record, rgb, flow)


def write_toy_dataset(root: str | Path, *, num_videos: int = 8, num_frames: int = 40, height: int = 24,
                      width: int = 32, num_static: int = 1, num_short: int = 0, short_frames: int = 5,
                      with_flow: bool = True, videos_per_shard: int = 4, quality: int = 95,
                      mutate=None) -> Path:
    """Write a dataset of `num_videos` videos (the first `num_static` static, the last `num_short`
    short) with manifest; split "1" puts every video in train and in test. `mutate(encoded)` may
    edit the encoded videos before they are written (tests plant corrupt frames that way)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    encoded = []
    for i in range(num_videos):
        kind = "static" if i < num_static else "moving"
        n = short_frames if i >= num_videos - num_short else num_frames
        label = i % 3
        encoded.append(toy_video(f"v_class{label}_g{i // 2:02d}_c{i % 2:02d}", label, n, height, width, kind,
                                 seed=i, with_flow=with_flow, quality=quality))
    if mutate is not None:
        mutate(encoded)
    records, shards = [], []
    for s in range(0, num_videos, videos_per_shard):
        index = s // videos_per_shard
        written = write_shard(root / shard_name(index), index, encoded[s : s + videos_per_shard], (), with_flow)
        records += written
        shards.append(shard_entry(root / shard_name(index), written))
    names = [r.name for r in records]
    params = {"flow": {"backend": "toy" if with_flow else "none"}, "jpeg_quality": quality}
    manifest = Manifest("toy", params, ["class0", "class1", "class2"], shards, records,
                        {"1": {"train": names, "test": names}})
    write_json_atomic(manifest_path(root), manifest.to_dict())
    return root
