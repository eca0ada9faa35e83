"""The shard layout: the one definition that the writer and every reader import.

Imports only the standard library and numpy, so that any reader (the DALI source, the baseline
loader, `verify`, a user's notebook) can depend on it without pulling in h5py, OpenCV or torch.

Layout version 1. A dataset directory holds `manifest.json` and shards `shard-00000.h5`, ...
Each shard is an HDF5 file:

    attrs:  layout_version (int), shard_index (int), videos (JSON list of VideoRecord dicts),
            failed (JSON list of FailedVideo dicts)
    rgb/bytes     uint8 [nbytes]           JPEG bytes of every RGB frame of every video, back to back
    rgb/offsets   int64 [frames + 1]       frame i is bytes[offsets[i]:offsets[i+1]]
    flow/bytes    uint8 [nbytes]           (absent when flow was not extracted)
    flow/offsets  int64 [2 * flow_frames + 1]
                                           flow frame i is two single-channel JPEG planes:
                                           2i = x component, 2i + 1 = y component

A video's frames are contiguous (`VideoRecord.rgb_start`, `VideoRecord.flow_start`), so a
32-frame clip is one contiguous read. A video of n frames has n - 1 flow frames (flow between
frames i and i + 1 is flow frame i).

Flow is quantised as u8 = round((clip(f, -20, 20) + 20) * 255 / 40), except that |f| < 20/255 (half a
level) is stored as 128: zero flow is 128.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LAYOUT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.h5"
TEMP_SUFFIX = ".tmp"

CHANNELS = {"rgb": 3, "flow": 2}

FLOW_BOUND = 20.0  # pixels; each flow component is clipped to ±FLOW_BOUND before quantisation
FLOW_ZERO = 128  # the u8 level that stands for zero flow
FLOW_SCALE = 128.0  # (u8 - FLOW_ZERO) / FLOW_SCALE ~ flow / FLOW_BOUND in [-1, 1]


class LayoutError(RuntimeError):
    """A dataset directory or shard that this version of cvtcl cannot read as it is."""


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
    def from_dict(cls, data: dict[str, Any]) -> VideoRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise LayoutError(f"video record has unknown fields {sorted(unknown)}: {data}")
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
        check_layout_version(data.get("layout_version"), where)
        try:
            return cls(
                dataset=data["dataset"],
                params=data["params"],
                classes=list(data["classes"]),
                shards=list(data["shards"]),
                videos=[VideoRecord.from_dict(v) for v in data["videos"]],
                splits={k: dict(v) for k, v in data["splits"].items()},
                failed=[FailedVideo(**f) for f in data.get("failed", [])],
                layout_version=data["layout_version"],
            )
        except KeyError as err:
            raise LayoutError(f"{where}: missing key {err}; the file is damaged or not a cvtcl manifest") from None


def check_layout_version(found: Any, where: str) -> None:
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
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LayoutError(f"{path} is not valid JSON ({err}); re-run the preprocessing command") from None
    return Manifest.from_dict(data, where=str(path))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename: readers never see half a file."""
    path = Path(path)
    # a temporary name per writer: the parts of a split run (`--part`) write the same params.json
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}{TEMP_SUFFIX}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
