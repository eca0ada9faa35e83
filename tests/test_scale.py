"""Kinetics scale without decoding a video: a 250 k-clip index in 4,000+ shards stays under 2 GB
of RSS through indexing, planning, part markers, merge and the readers' start; readers keep a
bounded number of shards open."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dali_pipelines.toy_shards import write_toy_dataset
from preprocess.shards import ShardReader

ROOT = Path(__file__).resolve().parents[1]
VIDEOS, PER_SHARD, PARTS = 250_000, 60, 8  # 4,167 shards, K400's size (240 k train + 20 k val)
RSS_LIMIT_MB = 2048

# One child process per stage, as on a cluster: part writers and then the merge + a reader.
# Each prints its own peak RSS: VmHWM, not ru_maxrss, which after fork + exec also holds the
# parent's peak (a pytest process that ran the whole suite first is well over 2 GB). Records
# are made up (no video is decoded) and every shard is a copy of one tiny real shard (the part
# marker reads its layout regions and index checksum): merge checks sizes, not contents.
PEAK_RSS = """
def peak_rss_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024
"""

PART_WRITER = PEAK_RSS + """
import sys
from pathlib import Path
from preprocess.kinetics import index_kinetics400
from preprocess.pack import PackOptions, plan_shards, prepare_out, run_params
from preprocess.parts import Part, record_part
from preprocess.schema import FailedVideo, VideoRecord, shard_name

base, parts = Path(sys.argv[1]), int(sys.argv[2])
template = Path(sys.argv[4]).read_bytes()
index = index_kinetics400(base / "videos", base / "annotations")
options = PackOptions(out=str(base / "out"), videos_per_shard=int(sys.argv[3]), flow="none")
params = run_params(index, options)
prepare_out(Path(options.out), params)
plan = plan_shards(index, options.videos_per_shard)
for p in range(parts):  # every part in turn, in one process: the peak is that of the largest
    part, done = Part(p, parts), {}
    for i in filter(part.owns, range(len(plan))):
        (Path(options.out) / shard_name(i)).write_bytes(template)
        records = [VideoRecord(v.name, v.class_name, v.label, v.group, 300, 29.97, 256, 340, i, 300 * k, -1)
                   for k, v in enumerate(plan[i][1:])]
        done[i] = (records, [FailedVideo(plan[i][0].name, plan[i][0].path, "no such file")])
    record_part(Path(options.out), index, part, params, done)
print(len(plan), peak_rss_mb())
"""

MERGE_AND_READ = PEAK_RSS + """
import os, sys
from preprocess.parts import merge
from preprocess.shards import ShardReader

out = sys.argv[1]
manifest = merge(out)
del manifest
reader = ShardReader(out, split="1", subset="train")
fds = os.listdir("/proc/self/fd")  # the listing's own descriptor is gone once listed
open_shards = [p for p in fds if os.path.exists(f"/proc/self/fd/{p}") and os.readlink(f"/proc/self/fd/{p}").endswith(".h5")]
print(len(reader.videos), len(open_shards), peak_rss_mb())
"""


def _write_annotations(base: Path) -> None:
    (base / "videos").mkdir(parents=True)  # empty: every clip is a missing download
    (base / "annotations").mkdir()
    for subset, first, count in (("train", 0, VIDEOS - 20_000), ("validate", VIDEOS - 20_000, 20_000)):
        with open(base / "annotations" / f"{subset}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
            writer.writerows([f"class {i % 400:03d}", f"yt{i:09d}", i % 290, i % 290 + 10, subset, 0]
                             for i in range(first, first + count))


def _child(script: str, *args) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return [int(x) for x in result.stdout.split()]


@pytest.mark.slow
def test_kinetics_size_index_and_merge_stay_under_2_gb(tmp_path):
    _write_annotations(tmp_path)
    template = write_toy_dataset(tmp_path / "toy", num_videos=1, num_frames=2, videos_per_shard=1) / "shard-00000.h5"
    shards, writer_mb = _child(PART_WRITER, tmp_path, PARTS, PER_SHARD, template)
    assert shards == -(-VIDEOS // PER_SHARD) >= 4000
    train, open_shards, merge_mb = _child(MERGE_AND_READ, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == shards and len(manifest["failed"]) == shards
    assert len(manifest["videos"]) == VIDEOS - shards
    assert open_shards == 0  # the reader opens shards on first read only
    print(f"peak RSS: index + part markers {writer_mb} MB, merge + reader {merge_mb} MB")
    assert writer_mb < RSS_LIMIT_MB and merge_mb < RSS_LIMIT_MB


def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path):
    root = write_toy_dataset(tmp_path / "toy", num_videos=6, num_frames=4, videos_per_shard=1)
    reader = ShardReader(root, max_open_files=2)
    first = reader.read_rgb(reader.videos[0], 0, 2)
    for video in reader.videos:
        reader.read_rgb(video, 0, 2)
        reader.read_flow(video, 0, 1)
        assert len(reader._files) <= 2 and {s for s, _ in reader._tables} <= set(reader._files)
    assert list(reader._files) == [4, 5]  # the least recently used were closed
    again = reader.read_rgb(reader.videos[0], 0, 2)  # reopened on demand
    assert [a.tobytes() for a in again] == [f.tobytes() for f in first]
    with pytest.raises(ValueError, match="max_open_files"):
        ShardReader(root, max_open_files=0)


def test_a_reopened_shard_is_not_checked_again(tmp_path, monkeypatch):
    """An epoch visits videos in random order: at Kinetics size almost every read reopens a shard,
    and each reopen read and checksummed its whole index (~0.7 MB) and parsed its header again."""
    from preprocess import shards

    root = write_toy_dataset(tmp_path / "toy", num_videos=6, num_frames=4, videos_per_shard=2)
    checked, parsed = [], []
    real_check, real_record = shards.check_shard_index, shards.VideoRecord.from_dict
    monkeypatch.setattr(shards, "check_shard_index", lambda m, r, path, a: checked.append(path.name) or
                        real_check(m, r, path, a))
    monkeypatch.setattr(shards.VideoRecord, "from_dict", staticmethod(lambda d, where: parsed.append(where) or
                                                                      real_record(d, where)))
    reader = ShardReader(root, max_open_files=1)
    for _ in range(3):  # every read reopens: 3 shards, one open at a time
        for video in reader.videos:
            reader.read_rgb(video, 0, 2)
            reader.read_flow(video, 0, 1)
    assert sorted(checked) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert len([w for w in parsed if w.endswith(".h5")]) == 6 * 2  # a header of 2 records per video's first read


def test_a_pickled_reader_leaves_the_full_video_list_behind(tmp_path):
    import pickle

    root = write_toy_dataset(tmp_path / "toy", num_videos=6, num_frames=4, videos_per_shard=2)
    reader = ShardReader(root, split="1", subset="test")
    copy = pickle.loads(pickle.dumps(reader))  # what a DALI or DataLoader worker receives
    assert copy.videos == reader.videos and copy.group_ids == reader.group_ids and copy.has_flow
    assert copy.manifest.videos == [] and copy.manifest.splits == {}  # a worker reads `videos` only
    assert [a.tobytes() for a in copy.read_rgb(copy.videos[3], 0, 2)] == \
        [a.tobytes() for a in reader.read_rgb(reader.videos[3], 0, 2)]
