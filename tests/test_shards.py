"""The shard writer and reader round-trip frames exactly, atomically and deterministically."""

import json

import cv2
import numpy as np
import pytest

from preprocess.schema import (
    LAYOUT_VERSION,
    FailedVideo,
    LayoutError,
    Manifest,
    VideoRecord,
    dequantise_flow,
    quantise_flow,
    shard_name,
    write_json_atomic,
)
from preprocess.shards import EncodedVideo, ShardReader, file_sha256, read_shard_header, shard_entry, write_shard


def _encoded(name, n, h=8, w=10, seed=0):
    rng = np.random.default_rng(seed)
    rgb = [cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes() for _ in range(n)]
    flow = [(bytes([i, 1, 2]), bytes([i, 3])) for i in range(n - 1)]
    rec = VideoRecord(name=name, class_name="A", label=0, group="A_g01", num_frames=n, fps=25.0, height=h, width=w)
    return EncodedVideo(rec, rgb, flow)


def _dataset(tmp_path, videos):
    records = write_shard(tmp_path / shard_name(0), 0, videos, [FailedVideo("bad", "x/bad.avi", "empty")])
    man = Manifest("toy", {"flow": {"backend": "fake"}}, ["A"], [shard_entry(tmp_path / shard_name(0), records)], records,
                   {"1": {"train": [records[0].name], "test": [r.name for r in records[1:]]}})
    write_json_atomic(tmp_path / "manifest.json", man.to_dict())
    return records


def test_round_trip_and_split(tmp_path):
    videos = [_encoded("v1", 5, seed=1), _encoded("v2", 7, seed=2)]
    records = _dataset(tmp_path, videos)
    assert [r.rgb_start for r in records] == [0, 5]
    assert [r.flow_start for r in records] == [0, 4]
    reader = ShardReader(tmp_path, split="1", subset="test")
    assert [v.name for v in reader.videos] == ["v2"]
    v2 = reader.videos[0]
    frames = reader.read_rgb(v2, 2, 3)
    assert [f.tobytes() for f in frames] == videos[1].rgb[2:5]
    flows = reader.read_flow(v2, 1, 2)
    assert [(x.tobytes(), y.tobytes()) for x, y in flows] == videos[1].flow[1:3]
    with pytest.raises(IndexError):
        reader.read_rgb(v2, 5, 3)
    header, failed = read_shard_header(tmp_path / shard_name(0))
    assert header == records and failed[0].reason == "empty"


def test_shard_bytes_are_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in "ab":
        write_shard(tmp_path / sub / "s.h5", 0, [_encoded("v", 4)])
    assert file_sha256(tmp_path / "a/s.h5") == file_sha256(tmp_path / "b/s.h5")
    assert not list(tmp_path.glob("*/*.tmp"))


def test_reader_is_picklable_without_handles(tmp_path):
    import pickle

    _dataset(tmp_path, [_encoded("v1", 3)])
    reader = ShardReader(tmp_path)
    reader.read_rgb(reader.videos[0], 0, 1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {}
    assert clone.read_rgb(clone.videos[0], 0, 3)[2].tobytes() == reader.read_rgb(reader.videos[0], 2, 1)[0].tobytes()


def test_version_mismatch_is_refused(tmp_path):
    _dataset(tmp_path, [_encoded("v1", 3)])
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["layout_version"] = LAYOUT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LayoutError, match="layout version"):
        ShardReader(tmp_path)


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ShardReader(tmp_path)


def test_flow_quantisation():
    assert quantise_flow(np.zeros(3))[0] == 128
    assert quantise_flow(np.array([-100.0, 100.0])).tolist() == [0, 255]
    f = np.linspace(-20, 20, 101, dtype=np.float32)
    assert np.abs(dequantise_flow(quantise_flow(f)) - f).max() <= 20 / 255 + 1e-5


def test_a_shard_reads_without_hdf5_file_locks(tmp_path):
    """HDF5 locks a file it opens, and an open it cannot lock fails ("unable to lock file"): on a
    filesystem without locks (NFS, Lustre mounted so) every read of the dataset did. A finished
    shard never changes, so readers take no lock; here another holder's exclusive lock stands in
    for the filesystem's refusal."""
    import fcntl
    import os

    from preprocess.verify import verify

    videos = [_encoded("v1", 5, seed=1), _encoded("v2", 7, seed=2)]
    records = _dataset(tmp_path, videos)
    holder = os.open(tmp_path / shard_name(0), os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        reader = ShardReader(tmp_path, split="1", subset="test")
        assert [f.tobytes() for f in reader.read_rgb(reader.videos[0], 0, 2)] == videos[1].rgb[:2]
        assert read_shard_header(tmp_path / shard_name(0))[0] == records
        assert not [p for p in verify(tmp_path) if "lock" in p]  # (the fake flow planes are no JPEGs)
    finally:
        os.close(holder)
