"""Writing and reading HDF5 shards in the layout that `schema` defines.

The writer never leaves a half shard under a final name (temp name, fsync, rename). The reader is
picklable and opens HDF5 files lazily, in the process that reads: a handle opened before a fork
is shared by the children and corrupts HDF5's state, so `__getstate__` drops every handle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from preprocess.schema import (
    LAYOUT_VERSION,
    TEMP_SUFFIX,
    FailedVideo,
    LayoutError,
    Manifest,
    VideoRecord,
    check_layout_version,
    load_manifest,
    shard_name,
)


@dataclass
class EncodedVideo:
    """A video ready to pack: its record and its encoded frames.

    rgb: one JPEG per frame. flow: one (x plane, y plane) pair of single-channel JPEGs per flow
    frame, n - 1 of them, or None when flow is not extracted.
    """

    record: VideoRecord
    rgb: list[bytes]
    flow: list[tuple[bytes, bytes]] | None


def _blob(chunks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks], dtype=np.int64)
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, np.uint8)
    return data, offsets


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shard(
    path: str | os.PathLike,
    shard_index: int,
    videos: Sequence[EncodedVideo],
    failed: Sequence[FailedVideo] = (),
    with_flow: bool = True,
) -> list[VideoRecord]:
    """Write one shard atomically; returns the records with shard/rgb_start/flow_start filled in.

    The file is byte-for-byte deterministic for the same input (no HDF5 timestamps), so a
    resumed run produces the same checksums as an uninterrupted one.
    """
    path = Path(path)
    records: list[VideoRecord] = []
    rgb_chunks: list[bytes] = []
    flow_chunks: list[bytes] = []
    for video in videos:
        rec = video.record
        if len(video.rgb) != rec.num_frames:
            raise ValueError(f"{rec.name}: {len(video.rgb)} RGB frames but record says {rec.num_frames}")
        flow_start = -1
        if with_flow:
            if video.flow is None or len(video.flow) != rec.num_flow_frames:
                got = None if video.flow is None else len(video.flow)
                raise ValueError(f"{rec.name}: {got} flow frames, expected {rec.num_flow_frames}")
            flow_start = len(flow_chunks) // 2
            for x_plane, y_plane in video.flow:
                flow_chunks += [x_plane, y_plane]
        records.append(replace(rec, shard=shard_index, rgb_start=len(rgb_chunks), flow_start=flow_start))
        rgb_chunks += video.rgb

    tmp = path.with_name(path.name + TEMP_SUFFIX)
    with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as h5:
        h5.attrs["layout_version"] = LAYOUT_VERSION
        h5.attrs["shard_index"] = shard_index
        h5.attrs["videos"] = json.dumps([r.to_dict() for r in records])
        h5.attrs["failed"] = json.dumps([f.to_dict() for f in failed])
        groups = [("rgb", rgb_chunks)] + ([("flow", flow_chunks)] if with_flow else [])
        for modality, chunks in groups:
            data, offsets = _blob(chunks)
            grp = h5.create_group(modality, track_order=False)
            grp.create_dataset("bytes", data=data, track_times=False)
            grp.create_dataset("offsets", data=offsets, track_times=False)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return records


def read_shard_header(path: str | os.PathLike) -> tuple[list[VideoRecord], list[FailedVideo]]:
    """The records and failures stored in a complete shard (used to resume a run)."""
    with h5py.File(path, "r") as h5:
        check_layout_version(int(h5.attrs.get("layout_version", -1)), str(path))
        videos = [VideoRecord.from_dict(v) for v in json.loads(h5.attrs["videos"])]
        failed = [FailedVideo(**f) for f in json.loads(h5.attrs["failed"])]
    return videos, failed


def read_frames(blob, offsets: np.ndarray) -> list[np.ndarray]:
    """The encoded frames bounded by `offsets` (count + 1 consecutive entries of a shard's
    `<modality>/offsets`), cut from `blob` (its `<modality>/bytes` dataset) with one read."""
    lo = int(offsets[0])
    data = blob[lo : int(offsets[-1])]
    rel = offsets - lo
    return [data[rel[i] : rel[i + 1]] for i in range(len(offsets) - 1)]


class ShardReader:
    """Random access to the frames of a packed dataset.

    `reader.videos` lists the videos of the chosen split subset (all videos when `split` is None).
    Reads return JPEG byte strings as numpy uint8 views into one contiguous read. Shards are opened
    on first read and at most `max_open_files` stay open (least recently used closed first), with
    their offset tables: a Kinetics-size dataset has 4,000+ shards and 200 M offsets, more than
    a process's file limit and 1.6 GB of tables.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, subset: str = "train",
                 max_open_files: int = 64):
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        videos = self.manifest.videos
        if split is not None:
            if split not in self.manifest.splits:
                raise KeyError(
                    f"{self.root}: no split {split!r}; this dataset has splits {sorted(self.manifest.splits)}"
                )
            members = self.manifest.splits[split]
            if subset not in members:
                raise KeyError(f"{self.root}: split {split} has subsets {sorted(members)}, not {subset!r}")
            wanted = set(members[subset])
            videos = [v for v in videos if v.name in wanted]
        self.videos: list[VideoRecord] = videos
        groups = sorted({v.group for v in self.manifest.videos})
        self.group_ids = {g: i for i, g in enumerate(groups)}
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.max_open_files = max_open_files
        self._files: OrderedDict[int, h5py.File] = OrderedDict()  # least recently used first
        self._offsets: dict[tuple[int, str], np.ndarray] = {}

    # Handles are per process: never pickled, reopened on first use after unpickling. A loader
    # worker reads `videos` only: the manifest's full video list and splits stay behind (at
    # Kinetics size 382 -> 207 MB per worker with VideoRecord's slots, measured).
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_offsets"] = {}
        state["manifest"] = replace(self.manifest, videos=[], splits={})
        return state

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()
        self._files.clear()
        self._offsets.clear()

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def has_flow(self) -> bool:
        return self.manifest.has_flow

    def _file(self, shard: int) -> h5py.File:
        h5 = self._files.get(shard)
        if h5 is not None:
            self._files.move_to_end(shard)
        else:
            while len(self._files) >= self.max_open_files:
                evicted, old = self._files.popitem(last=False)
                old.close()
                for modality in ("rgb", "flow"):
                    self._offsets.pop((evicted, modality), None)
            path = self.root / shard_name(shard)
            try:
                h5 = h5py.File(path, "r")
            except OSError as err:
                raise LayoutError(
                    f"cannot open shard {path} ({err}); run `cvtcl-preprocess verify {self.root}`"
                ) from None
            check_layout_version(int(h5.attrs.get("layout_version", -1)), str(path))
            self._files[shard] = h5
        return h5

    def _offsets_of(self, shard: int, modality: str) -> np.ndarray:
        key = (shard, modality)
        if key not in self._offsets:
            h5 = self._file(shard)
            if modality not in h5:
                raise LayoutError(f"{self.root}: shard {shard} has no {modality} frames (preprocessed with --flow none?)")
            self._offsets[key] = h5[modality]["offsets"][()]
        return self._offsets[key]

    def _read_range(self, shard: int, modality: str, first: int, count: int) -> list[np.ndarray]:
        offsets = self._offsets_of(shard, modality)[first : first + count + 1]
        return read_frames(self._file(shard)[modality]["bytes"], offsets)

    def read_rgb(self, video: VideoRecord, start: int, count: int) -> list[np.ndarray]:
        """JPEG bytes of frames start .. start + count - 1 of `video`, in one read."""
        if start < 0 or start + count > video.num_frames:
            raise IndexError(f"{video.name}: frames {start}..{start + count - 1} outside 0..{video.num_frames - 1}")
        return self._read_range(video.shard, "rgb", video.rgb_start + start, count)

    def read_flow(self, video: VideoRecord, start: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(x plane, y plane) JPEG bytes of flow frames start .. start + count - 1, in one read."""
        if video.flow_start < 0:
            raise LayoutError(f"{self.root}: {video.name} has no flow (preprocessed with --flow none?)")
        if start < 0 or start + count > video.num_flow_frames:
            raise IndexError(
                f"{video.name}: flow frames {start}..{start + count - 1} outside 0..{video.num_flow_frames - 1}"
            )
        planes = self._read_range(video.shard, "flow", 2 * (video.flow_start + start), 2 * count)
        return [(planes[2 * i], planes[2 * i + 1]) for i in range(count)]
