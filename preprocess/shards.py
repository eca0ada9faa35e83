"""Writing and reading HDF5 shards in the layout that `schema` defines.

The writer never leaves a half shard under a final name (temp name, fsync, rename). It builds the
HDF5 image in memory and writes it with plain file I/O, so a full disk or an unwritable directory
is one OSError (HDF5's own write path printed a hundred lines of error stack, then crashed).
The reader is picklable and opens HDF5 files lazily, in the process that reads: a handle opened
before a fork is shared by the children and corrupts HDF5's state, so `__getstate__` drops every
handle. It checks each shard's index against the manifest when it opens it and each frame's
crc32 on every read (schema.py, layout version 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from preprocess.hygiene import die_with_parent_if_child, kill_forked_children_with_parent
from preprocess.schema import (
    LAYOUT_VERSION,
    TEMP_SUFFIX,
    CorruptFrameError,
    FailedVideo,
    LayoutError,
    Manifest,
    VideoRecord,
    check_layout_version,
    frame_crc32,
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


def _blob(chunks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks], dtype=np.int64)
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, np.uint8)
    crcs = np.array([frame_crc32(c) for c in chunks], dtype=np.uint32)
    return data, offsets, crcs


def write_file_atomic(path: Path, data, before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` via a temporary name, fsync, `before_rename()`, rename. On any OSError
    (ENOSPC, EACCES, EROFS) the temporary file is removed and the error propagates; `path` is
    untouched."""
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def open_shard(path: str | os.PathLike) -> h5py.File:
    """A shard opened for reading, without HDF5's file locks: a finished shard never changes (its
    writer renames the whole file into place), and a filesystem without locks (NFS, or Lustre
    mounted so, as on many clusters) or another process's lock made every open fail ("unable to
    lock file")."""
    return h5py.File(path, "r", locking=False)


def data_regions(path: str | os.PathLike) -> list[list[int]]:
    """[[file offset, bytes], ...] of the shard's `*/bytes` data, in file order (empty ones left out)."""
    with open_shard(path) as h5:
        return sorted(
            [h5[m]["bytes"].id.get_offset(), h5[m]["bytes"].id.get_storage_size()]
            for m in ("rgb", "flow") if m in h5 and h5[m]["bytes"].id.get_offset() is not None
        )


def index_crc32(path: str | os.PathLike, regions: Sequence[Sequence[int]]) -> int:
    """zlib.crc32 of every byte of a shard outside its `data_regions` (schema.py): the metadata,
    offsets and checksum tables. Plain file reads, no HDF5: damaged metadata is found before the
    HDF5 library parses it."""
    crc, position = 0, 0
    with open(path, "rb") as fh:
        for start, size in [*regions, (os.fstat(fh.fileno()).st_size, 0)]:
            if start < position:
                raise LayoutError(f"{path}: data regions {regions} overlap or are out of order")
            fh.seek(position)
            crc = zlib.crc32(fh.read(start - position), crc)
            position = start + size
    return crc


def check_shard_index(manifest: Manifest, root: Path, path: Path, advice: str) -> None:
    """The shard's index (HDF5 metadata, offsets, checksums) is the one the manifest recorded. Every
    reader checks it the first time it opens a shard; the trainer also checks it before any work, so that a
    damaged index stops a run before it writes anything (cvtcl/preflight.py)."""
    entry = manifest.shard_entries.get(path.name)
    if entry is None:
        raise LayoutError(f"{root}/manifest.json lists no shard {path.name}; {advice}")
    found = index_crc32(path, entry["data_regions"])
    if found != entry["index_crc32"]:
        raise LayoutError(f"{path}: its index (HDF5 metadata, offsets or checksums) is damaged: "
                          f"crc32 {found} differs from the manifest's {entry['index_crc32']}; {advice}")


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
    record_sha256: Callable[[str], None] | None = None,
) -> list[VideoRecord]:
    """Write one shard atomically; returns the records with shard/rgb_start/flow_start filled in.
    `record_sha256(sha256 of the file)` runs before the shard takes its final name: a run killed
    in between leaves a recorded sha256 that no file under that name matches (rebuilt on resume),
    never a finished shard without its record.

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

    image = io.BytesIO()
    with h5py.File(image, "w", libver=("earliest", "v110"), track_order=False) as h5:
        h5.attrs["layout_version"] = LAYOUT_VERSION
        h5.attrs["shard_index"] = shard_index
        h5.attrs["videos"] = json.dumps([r.to_dict() for r in records])
        h5.attrs["failed"] = json.dumps([f.to_dict() for f in failed])
        groups = [("rgb", rgb_chunks)] + ([("flow", flow_chunks)] if with_flow else [])
        for modality, chunks in groups:
            data, offsets, crcs = _blob(chunks)
            grp = h5.create_group(modality, track_order=False)
            grp.create_dataset("bytes", data=data, track_times=False)
            grp.create_dataset("offsets", data=offsets, track_times=False)
            grp.create_dataset("crc32", data=crcs, track_times=False)
    data = image.getbuffer()
    record = None if record_sha256 is None else (lambda: record_sha256(hashlib.sha256(data).hexdigest()))
    write_file_atomic(path, data, record)
    return records


def _header_list(h5: h5py.File, key: str, path: str | os.PathLike) -> list:
    """The JSON list in the shard's `key` attribute. Missing or not JSON is a LayoutError saying the
    header is damaged, not json's 'Expecting ':' delimiter: line 1 column 3949'."""
    try:
        value = json.loads(h5.attrs[key])
    except KeyError:
        raise LayoutError(f"{path}: its header has no {key!r} list (damaged or not a cvtcl shard)") from None
    except (ValueError, TypeError):  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise LayoutError(f"{path}: its header (the {key!r} list) is damaged: not valid JSON") from None
    if not isinstance(value, list):
        raise LayoutError(f"{path}: its header's {key!r} is {type(value).__name__}, expected a list (damaged)")
    return value


def read_shard_header(path: str | os.PathLike) -> tuple[list[VideoRecord], list[FailedVideo]]:
    """The records and failures stored in a complete shard (used to resume a run). A damaged
    header is a LayoutError naming the file."""
    with open_shard(path) as h5:
        check_layout_version(int(h5.attrs.get("layout_version", -1)), str(path))
        videos = [VideoRecord.from_dict(v, str(path)) for v in _header_list(h5, "videos", path)]
        try:
            failed = [FailedVideo(**f) for f in _header_list(h5, "failed", path)]
        except TypeError:  # not a dict, or other fields
            raise LayoutError(f"{path}: its header's 'failed' list is damaged (records of other fields)") from None
    return videos, failed


def shard_entry(path: Path, records: Sequence[VideoRecord], sha256: str | None = None) -> dict:
    """The manifest's entry of a complete shard (schema.SHARD_ENTRY_FIELDS)."""
    return {
        "file": path.name,
        "sha256": sha256 or file_sha256(path),
        "num_videos": len(records),
        "num_frames": sum(r.num_frames for r in records),
        "bytes": path.stat().st_size,
        "data_regions": (regions := data_regions(path)),
        "index_crc32": index_crc32(path, regions),
    }


def record_mismatch(listed: Sequence[VideoRecord], header: Sequence[VideoRecord]) -> str | None:
    """How the manifest's records of a shard (`listed`) differ from the shard's own (`header`):
    the first video and field that differ, or None when they agree."""
    if [v.name for v in listed] != [v.name for v in header]:
        return f"the manifest lists videos {[v.name for v in listed][:3]}..., the shard holds {[v.name for v in header][:3]}..."
    for mine, theirs in zip(listed, header):
        for key, value in mine.to_dict().items():
            if getattr(theirs, key) != value:
                return f"video {mine.name}: manifest {key}={value!r}, the shard's own index says {getattr(theirs, key)!r}"
    return None


def first_bad_crc(frames: Sequence[np.ndarray], crcs: np.ndarray) -> int | None:
    """Index of the first frame whose crc32 differs from the stored one, or None."""
    for i, (buf, crc) in enumerate(zip(frames, crcs)):
        if frame_crc32(buf) != int(crc):
            return i
    return None


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
    on first read and at most `max_open_files` stay open (least recently used closed first): a
    Kinetics-size dataset has 4,000+ shards, more than a process's file limit. An epoch visits the
    videos in random order, so at that size almost every read reopens a shard (98% of them at 64
    open, replayed). So each shard's index is checked against the manifest once per process and
    each video's record against its shard's once; a reopen costs the HDF5 open and a read of the
    modality's offset and checksum tables.
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
        self._checked_shards: set[int] = set()  # index crc32 matched the manifest's (this process)
        self._checked_videos: set[str] = set()  # record matched its shard's header (this process)
        self._tables: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, h5py.Dataset]] = {}  # open shards'

        kill_forked_children_with_parent()  # DALI / DataLoader workers forked from here die with us

    # Handles are per process: never pickled, reopened on first use after unpickling. A loader
    # worker reads `videos` only: the manifest's full video list and splits stay behind (at
    # Kinetics size 382 -> 207 MB per worker with VideoRecord's slots, measured).
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_checked_shards"], state["_checked_videos"], state["_tables"] = set(), set(), {}
        state["manifest"] = replace(self.manifest, videos=[], splits={})
        return state

    def __setstate__(self, state):
        # DALI unpickles its spawned workers' source, this reader included, at worker start: the
        # one hook it offers before the worker waits for work.
        die_with_parent_if_child()
        self.__dict__.update(state)

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()
        self._files.clear()
        self._tables.clear()

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
                    self._tables.pop((evicted, modality), None)
            path = self.root / shard_name(shard)
            try:
                if shard not in self._checked_shards:  # before HDF5 parses a byte of it
                    check_shard_index(self.manifest, self.root, path, self._advice)
                    self._checked_shards.add(shard)
                h5 = open_shard(path)
            except OSError as err:
                raise LayoutError(f"cannot open shard {path} ({err}); {self._advice}") from None
            try:
                check_layout_version(int(h5.attrs.get("layout_version", -1)), str(path))
            except LayoutError:
                h5.close()
                raise
            self._files[shard] = h5
        return h5

    @property
    def _advice(self) -> str:
        return f"run `cvtcl-preprocess verify {self.root}` and re-run preprocessing"

    def _check_record(self, video: VideoRecord, h5: h5py.File) -> None:
        """The manifest's record of `video` (counts, offsets) is the shard's own: an edited manifest
        would read shifted frames. Parsed from the shard's header the first time the video is read."""
        if video.name in self._checked_videos:
            return
        path = self.root / shard_name(video.shard)
        try:
            header = [VideoRecord.from_dict(v, str(path)) for v in json.loads(h5.attrs["videos"])]
        except (KeyError, ValueError) as err:
            raise LayoutError(f"{path}: header cannot be read ({err}); {self._advice}") from None
        own = next((v for v in header if v.name == video.name), None)
        if own != video:
            mismatch = record_mismatch([video], [own] if own else [])
            raise LayoutError(f"{self.root}/manifest.json and {shard_name(video.shard)} disagree: {mismatch}; "
                              f"{self._advice}")
        self._checked_videos.add(video.name)

    def _tables_of(self, shard: int, modality: str, h5: h5py.File) -> tuple[np.ndarray, np.ndarray, h5py.Dataset]:
        """(offsets, crc32, bytes) of an open shard's `modality`, read once while it stays open."""
        key = (shard, modality)
        if key not in self._tables:
            if modality not in h5:
                raise LayoutError(f"{self.root}: shard {shard} has no {modality} frames (preprocessed with --flow none?)")
            group = h5[modality]
            self._tables[key] = (group["offsets"][()], group["crc32"][()], group["bytes"])
        return self._tables[key]

    def _read_range(self, video: VideoRecord, modality: str, first: int, count: int) -> list[np.ndarray]:
        """`count` entries of the shard's `modality` tables from `first`, each checked against its
        crc32; a mismatch is a CorruptFrameError naming dataset, video, modality and frame."""
        h5 = self._file(video.shard)
        self._check_record(video, h5)
        offsets, crcs, blob = self._tables_of(video.shard, modality, h5)
        frames = read_frames(blob, offsets[first : first + count + 1])
        bad = first_bad_crc(frames, crcs[first : first + count])
        if bad is not None:
            if modality == "rgb":
                what, frame = "rgb", first + bad - video.rgb_start
            else:
                what, frame = ("flow-x", "flow-y")[(first + bad) % 2], (first + bad) // 2 - video.flow_start
            raise CorruptFrameError(
                f"{self.root}: video {video.name} {what} frame {frame} (shard {video.shard}) fails its checksum: "
                f"the shard is damaged; run `cvtcl-preprocess verify {self.root}` and re-run preprocessing"
            )
        return frames

    def read_rgb(self, video: VideoRecord, start: int, count: int) -> list[np.ndarray]:
        """JPEG bytes of frames start .. start + count - 1 of `video`, in one read."""
        if start < 0 or start + count > video.num_frames:
            raise IndexError(f"{video.name}: frames {start}..{start + count - 1} outside 0..{video.num_frames - 1}")
        return self._read_range(video, "rgb", video.rgb_start + start, count)

    def read_flow(self, video: VideoRecord, start: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(x plane, y plane) JPEG bytes of flow frames start .. start + count - 1, in one read."""
        if video.flow_start < 0:
            raise LayoutError(f"{self.root}: {video.name} has no flow (preprocessed with --flow none?)")
        if start < 0 or start + count > video.num_flow_frames:
            raise IndexError(
                f"{video.name}: flow frames {start}..{start + count - 1} outside 0..{video.num_flow_frames - 1}"
            )
        planes = self._read_range(video, "flow", 2 * (video.flow_start + start), 2 * count)
        return [(planes[2 * i], planes[2 * i + 1]) for i in range(count)]
