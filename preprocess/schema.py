"""The shard layout: the one definition that the writer and every reader import.

Imports only the standard library and numpy, so that any reader (the DALI source, the baseline
loader, `verify`, a user's notebook) can depend on it without pulling in h5py, OpenCV or torch.

Layout version 2. A dataset directory holds `manifest.json` and shards `shard-00000.h5`, ...
Each shard is an HDF5 file:

    attrs:  layout_version (int), shard_index (int), videos (JSON list of VideoRecord dicts),
            failed (JSON list of FailedVideo dicts)
    rgb/bytes     uint8 [nbytes]           JPEG bytes of every RGB frame of every video, back to back
    rgb/offsets   int64 [frames + 1]       frame i is bytes[offsets[i]:offsets[i+1]]
    rgb/crc32     uint32 [frames]          zlib.crc32 of frame i's bytes (new in version 2)
    flow/bytes    uint8 [nbytes]           (absent when flow was not extracted)
    flow/offsets  int64 [2 * flow_frames + 1]
                                           flow frame i is two single-channel JPEG planes:
                                           2i = x component, 2i + 1 = y component
    flow/crc32    uint32 [2 * flow_frames] zlib.crc32 of each plane

The manifest's entry of each shard: file, sha256 (whole file), bytes, num_videos, num_frames, and
(new in version 2) `data_regions`, the [file offset, bytes] pairs of the `*/bytes` data in file
order, and `index_crc32`, zlib.crc32 of every other byte of the file in file order (HDF5
metadata, attributes, offsets and crc32 tables). Readers check the index with plain file reads
once when they open a shard, before HDF5 parses it, and a frame's crc32 on every read (a few
microseconds per frame), so a damaged byte anywhere in a shard stops training with a message
naming it; `verify` also checks the sha256. Version 1 (no checksums) is refused with the advice to re-run
preprocessing, which rebuilds the shards in place.

A video's frames are contiguous (`VideoRecord.rgb_start`, `VideoRecord.flow_start`), so a
32-frame clip is one contiguous read. A video of n frames has n - 1 flow frames (flow between
frames i and i + 1 is flow frame i).

Flow is quantised as u8 = round((clip(f, -20, 20) + 20) * 255 / 40), except that |f| < 20/255 (half a
level) is stored as 128: zero flow is 128.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.hygiene import lock_holder, writer_temporary

LAYOUT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.h5"
TEMP_SUFFIX = ".tmp"

CHANNELS = {"rgb": 3, "flow": 2}

FLOW_BOUND = 20.0  # pixels; each flow component is clipped to ±FLOW_BOUND before quantisation
FLOW_ZERO = 128  # the u8 level that stands for zero flow
FLOW_SCALE = 128.0  # (u8 - FLOW_ZERO) / FLOW_SCALE ~ flow / FLOW_BOUND in [-1, 1]


class LayoutError(RuntimeError):
    """A dataset directory or shard that this version of cvtcl cannot read as it is."""


class CorruptFrameError(LayoutError):
    """A stored frame whose bytes are damaged (checksum, JPEG markers or decode); the message names
    the dataset, video, modality and frame."""


def frame_crc32(buf) -> int:
    """The checksum stored for one encoded frame (or flow plane)."""
    return zlib.crc32(buf)


def _expect(value: Any, kind, where: str, name: str):
    """`value` if it is a `kind`, else a LayoutError naming the file and the field."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise LayoutError(f"{where}: field {name!r} is {type(value).__name__} {value!r:.60}, expected {names}; "
                          "the file is damaged or edited: re-run the preprocessing command")
    return value


SHARD_ENTRY_FIELDS = {"file": str, "sha256": str, "num_videos": int, "num_frames": int, "bytes": int,
                      "data_regions": list, "index_crc32": int}


@dataclass(frozen=True, slots=True)  # slots: a Kinetics reader holds 250 k of them, in every loader worker
class VideoRecord:
    """One packed video. `rgb_start`/`flow_start` index the shard's frame tables."""

    name: str  # file stem, e.g. "v_ApplyEyeMakeup_g08_c01"
    class_name: str
    label: int  # 0-based class index
    group: str  # source group: clips of one group come from one long recording
    num_frames: int
    fps: float
    height: int
    width: int
    shard: int = -1
    rgb_start: int = -1
    flow_start: int = -1  # -1 when the dataset has no flow

    @property
    def num_flow_frames(self) -> int:
        return max(self.num_frames - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "video record") -> VideoRecord:
        _expect(data, dict, where, "videos[]")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise LayoutError(f"{where}: video record has unknown fields {sorted(unknown)}: {data}")
        name = data.get("name", "?")
        for key, f in fields.items():
            if key not in data:
                if f.default is dataclasses.MISSING:
                    raise LayoutError(f"{where}: video {name!r} misses field {key!r}; re-run the preprocessing command")
                continue
            kind = {"str": str, "int": int, "float": (int, float)}[f.type]
            _expect(data[key], kind, where, f"videos[{name}].{key}")
        if data["num_frames"] < 1:
            raise LayoutError(f"{where}: field 'videos[{name}].num_frames' is {data['num_frames']}, expected >= 1")
        return cls(**data)


@dataclass(frozen=True)
class FailedVideo:
    """A source video that could not be packed, and why; recorded instead of aborting the run."""

    name: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Manifest:
    """What `manifest.json` holds. Written last, atomically, once every shard is complete."""

    dataset: str
    params: dict[str, Any]  # every preprocessing parameter, flow backend and its settings included
    classes: list[str]
    shards: list[dict[str, Any]]  # {"file", "sha256", "num_videos", "num_frames", "bytes"}
    videos: list[VideoRecord]
    splits: dict[str, dict[str, list[str]]]  # split id -> {"train": [names], "test": [names]}
    failed: list[FailedVideo] = field(default_factory=list)
    layout_version: int = LAYOUT_VERSION

    @property
    def has_flow(self) -> bool:
        return self.params.get("flow", {}).get("backend", "none") != "none"

    @functools.cached_property
    def shard_entries(self) -> dict[str, dict[str, Any]]:
        """`shards` by file name: every shard's index is checked against its entry (3,750 shards at
        Kinetics size, a list scan each: ~1 s of the trainer's preflight)."""
        return {entry["file"]: entry for entry in self.shards}

    def check_flow_frames(self, names: set[str], root: str | os.PathLike) -> None:
        """LayoutError naming the videos of `names` with a single frame: they have no flow (an
        output of a cvtcl-preprocess that packed them; it records them as failed now)."""
        single = sorted(v.name for v in self.videos if v.name in names and v.num_frames < 2)
        if single:
            raise LayoutError(f"{root}: {len(single)} video(s) of a single frame have no flow (first: {single[0]}); "
                              "pack the dataset anew into another --out (this cvtcl-preprocess records them as failed), "
                              "or train and evaluate the rgb modality")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout_version": self.layout_version,
            "dataset": self.dataset,
            "params": self.params,
            "classes": self.classes,
            "shards": self.shards,
            "splits": self.splits,
            "videos": [v.to_dict() for v in self.videos],
            "failed": [f.to_dict() for f in self.failed],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Every field is checked for presence and type: a damaged or hand-edited manifest is a
        LayoutError naming `where` and the field, never an AttributeError deep in a reader."""
        _expect(data, dict, where, "(top level)")
        check_layout_version(data.get("layout_version"), where)
        missing = [k for k in ("dataset", "params", "classes", "shards", "videos", "splits") if k not in data]
        if missing:
            raise LayoutError(f"{where}: missing field {missing[0]!r}; the file is damaged or not a cvtcl manifest")
        shards = _expect(data["shards"], list, where, "shards")
        for i, entry in enumerate(shards):
            _expect(entry, dict, where, f"shards[{i}]")
            for key, kind in SHARD_ENTRY_FIELDS.items():
                if key not in entry:
                    raise LayoutError(f"{where}: field 'shards[{i}].{key}' is missing; re-run the preprocessing command")
                _expect(entry[key], kind, where, f"shards[{i}].{key}")
            for region in entry["data_regions"]:
                if not (isinstance(region, list) and len(region) == 2 and all(type(v) is int and v >= 0 for v in region)):
                    raise LayoutError(f"{where}: field 'shards[{i}].data_regions' holds {region!r}, expected "
                                      "[offset, bytes] pairs; re-run the preprocessing command")
        params = _expect(data["params"], dict, where, "params")
        _expect(params.get("flow", {}), dict, where, "params.flow")
        splits = _expect(data["splits"], dict, where, "splits")
        for split, subsets in splits.items():
            for subset, names in _expect(subsets, dict, where, f"splits[{split}]").items():
                _expect(names, list, where, f"splits[{split}][{subset}]")
        failed = _expect(data.get("failed", []), list, where, "failed")
        try:
            failed = [FailedVideo(**_expect(f, dict, where, "failed[]")) for f in failed]
        except TypeError as err:
            raise LayoutError(f"{where}: field 'failed' holds a malformed entry ({err})") from None
        return cls(
            dataset=_expect(data["dataset"], str, where, "dataset"),
            params=params,
            classes=list(_expect(data["classes"], list, where, "classes")),
            shards=shards,
            videos=[VideoRecord.from_dict(v, where) for v in _expect(data["videos"], list, where, "videos")],
            splits={k: dict(v) for k, v in splits.items()},
            failed=failed,
            layout_version=data["layout_version"],
        )


def check_layout_version(found: Any, where: str) -> None:
    if found == 1:
        raise LayoutError(
            f"{where} has shard layout version 1 (no per-frame checksums); this cvtcl reads version "
            f"{LAYOUT_VERSION}. Re-run the same `cvtcl-preprocess` command: it rebuilds the shards in place."
        )
    if found != LAYOUT_VERSION:
        raise LayoutError(
            f"{where} has shard layout version {found!r}, this cvtcl reads version {LAYOUT_VERSION}. "
            "Re-run `cvtcl-preprocess` with this version into a new --out directory "
            "(or install the cvtcl release that wrote it)."
        )


def manifest_path(root: str | os.PathLike) -> Path:
    return Path(root) / MANIFEST_NAME


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def load_manifest(root: str | os.PathLike) -> Manifest:
    path = manifest_path(root)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: not a finished cvtcl dataset. Run `cvtcl-preprocess` "
            "(ucf101 | hmdb51 | kinetics400 | synthetic) with --out pointing there; an interrupted run resumes "
            "when the same command is run again; after a run split with --part, `cvtcl-preprocess merge`."
        )
    return Manifest.from_dict(read_json(path, "re-run the preprocessing command"), where=str(path))


def manifest_digest(root: str | os.PathLike) -> str:
    """The identity of a finished dataset: the sha256 of its manifest (which names every shard's
    sha256) less the folder its videos were read from. A copy of the dataset elsewhere (a node's
    local disk), or a synthetic output moved and packed again there, has the same digest."""
    path = manifest_path(root)
    stat = path.stat()
    return _manifest_digest(str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)  # a schedule asks it of every sub-stage; Kinetics' manifest is ~40 MB of JSON
def _manifest_digest(path: str, inode: int, mtime_ns: int, size: int) -> str:
    data = read_json(path, "re-run the preprocessing command")
    data.get("params", {}).pop("source_root", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_json(path: str | os.PathLike, advice: str) -> Any:
    """A JSON file this project wrote; one that does not parse (damaged outside it: the project
    writes each atomically) is a LayoutError naming the file and what to do."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutError(f"{path} is not valid JSON ({err}); {advice}") from None


def check_not_being_written(root: str | os.PathLike) -> None:
    """A dataset that cvtcl-preprocess is writing right now (a first pack, or a rerun that redoes
    shards) is refused as that, not as missing or damaged shards whose advice (rerun the pack)
    the running pack would refuse."""
    holder = lock_holder(root)
    if holder is not None:
        raise LayoutError(f"{root} is being written by cvtcl-preprocess (pid {holder}): wait for it to finish, "
                          "then rerun")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename: readers never see half a file."""
    path = Path(path)
    tmp = writer_temporary(path)  # the parts of a split run (`--part`) write the same params.json
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk: leave no half temporary file behind
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a write's or fsync's error names no file: name the one meant
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


def quantise_flow(flow: np.ndarray) -> np.ndarray:
    """Flow in pixels (any shape) -> uint8, `round((clip(f, -20, 20) + 20) * 255 / 40)`."""
    clipped = np.clip(np.asarray(flow, dtype=np.float32), -FLOW_BOUND, FLOW_BOUND)
    levels = np.rint((clipped + FLOW_BOUND) * (255.0 / (2 * FLOW_BOUND))).astype(np.uint8)
    # Zero flow sits on the rounding boundary (127.5), so TV-L1's +-0.05 px noise in static
    # regions would flicker between 127 and 128. Flow within half a level of zero is stored as
    # 128, the level the loaders' (u8 - FLOW_ZERO) / FLOW_SCALE reads as exactly zero.
    levels[np.abs(clipped) < FLOW_BOUND / 255.0] = FLOW_ZERO
    return levels


def dequantise_flow(levels: np.ndarray) -> np.ndarray:
    """uint8 levels -> flow in pixels, the inverse of `quantise_flow` up to half a level (0.078 px);
    one level (0.157 px) for flow in (-0.078, 0), which is stored as 128."""
    return levels.astype(np.float32) * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND
