"""Flow workers batch pairs across videos (preprocess/flow_workers.py); the shards they help
write are byte-identical to the per-video path's."""

import numpy as np
import pytest

from preprocess.flow_workers import PairBatcher


def _video(frames: int, value: int, shape=(4, 5)) -> np.ndarray:
    return np.full((frames, *shape), value, np.uint8) + np.arange(frames, dtype=np.uint8)[:, None, None]


def test_batches_span_videos_and_results_come_back_per_video():
    batcher = PairBatcher(batch=4)
    batcher.add("a", _video(3, 10))  # 2 pairs
    batcher.add("b", _video(5, 50))  # 4 pairs
    batcher.add("c", _video(2, 90, shape=(6, 5)))  # another size: a batch of its own
    assert batcher.pending == 7
    frames, first, pieces = batcher.next_batch()
    # a's 2 pairs, then b's first 2: a's 3 frames and b's frames 0..2 back to back
    assert frames.shape == (6, 4, 5) and first.tolist() == [0, 1, 3, 4]
    assert frames[first + 1, 0, 0].tolist() == [11, 12, 51, 52]
    fake = frames[first].astype(np.float32)[..., None].repeat(2, axis=-1)  # "flow" = first frame
    assert [key for key, _ in batcher.put(pieces, fake)] == ["a"]
    frames, first, pieces = batcher.next_batch()
    assert frames.shape == (3, 4, 5) and first.tolist() == [0, 1]  # b's pairs 2 and 3, not c's
    done = dict(batcher.put(pieces, frames[first].astype(np.float32)[..., None].repeat(2, axis=-1)))
    assert list(done) == ["b"] and done["b"][:, 0, 0, 0].tolist() == [50, 51, 52, 53]
    frames, first, pieces = batcher.next_batch()
    assert frames.shape == (2, 6, 5) and first.tolist() == [0]
    assert [key for key, _ in batcher.put(pieces, np.zeros((1, 6, 5, 2), np.float32))] == ["c"]
    assert batcher.pending == 0 and not batcher.videos


@pytest.mark.multiprocess
def test_cross_video_batches_write_the_same_shards(tmp_path):
    """Two CPU flow workers, batches of 4 pairs over 5-frame videos (so every batch spans two
    videos) against the per-video path: the same shard bytes."""
    import dataclasses

    from preprocess.datasets import index_ucf101
    from preprocess.pack import PackOptions, pack
    from preprocess.synthetic import SyntheticConfig, generate_raw

    raw = generate_raw(SyntheticConfig(classes=2, videos_per_class=3, clips_per_group=1, frames=5,
                                       height=24, width=32), tmp_path / "raw")
    index = index_ucf101(raw, dataset="synthetic")
    base = PackOptions(out=str(tmp_path / "per_video"), workers=1, videos_per_shard=4, flow="tvl1-torch",
                       flow_options={"device": "cpu", "batch": 4})
    per_video = pack(index, base)
    crossed = pack(index, dataclasses.replace(base, out=str(tmp_path / "crossed"), workers=2,
                                              flow_devices=("cpu", "cpu")))
    assert per_video.params == crossed.params
    assert [s["sha256"] for s in per_video.shards] == [s["sha256"] for s in crossed.shards]
    assert len(per_video.videos) == 6 and not per_video.failed
