"""The packing run: source videos -> RGB JPEG frames + quantised flow -> HDF5 shards + manifest.

Deterministic: videos sorted by name go to shards of `videos_per_shard` in order (failed videos
keep their slot), so a shard's content never depends on the worker count or on what ran before.
Resumable: parameters are written to `params.json` before any shard; a rerun with the same
parameters keeps every shard whose header reads back with the planned videos and redoes the rest;
a rerun with other parameters is refused. The manifest is written last, atomically, so a
directory with a manifest is a finished dataset (docs/design.md, Storage).

Workers are spawned processes (never forked: a flow backend may hold CUDA state, and forking
OpenCV's thread pool can deadlock); each builds its own flow backend, or, with
`PackOptions.flow_devices`, decodes only and hands its grey frames to the flow workers
(preprocess/flow_workers.py), which batch pairs across videos on the GPUs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from preprocess.datasets import DatasetIndex, SourceVideo
from preprocess.flow import FlowBackend, encode_flow, make_backend
from preprocess.flow_workers import run_with_flow_workers
from preprocess.progress import Progress
from preprocess.schema import (
    LAYOUT_VERSION,
    FailedVideo,
    LayoutError,
    Manifest,
    VideoRecord,
    manifest_path,
    shard_name,
    write_json_atomic,
)
from preprocess.shards import EncodedVideo, file_sha256, read_shard_header, write_shard
from preprocess.video import VideoDecodeError, open_video

PARAMS_NAME = "params.json"
EXIT_OK, EXIT_SOME_FAILED, EXIT_CONFIG = 0, 3, 2
FLOW_CHUNK = 64  # frames per flow call: bounds a worker's memory on long videos
ShardContent = tuple[list[VideoRecord], list[FailedVideo]]  # a shard's records and failed videos


class ConfigError(RuntimeError):
    """Bad arguments or an output directory that cannot be used; nothing was written."""


@dataclass(frozen=True)
class PackOptions:
    """How to pack; everything except `workers` is recorded in the manifest's params."""

    out: str
    workers: int = 1
    videos_per_shard: int = 64
    jpeg_quality: int = 90
    # 95 is OpenCV's imwrite default, what CoCLR/I3D-style extraction scripts stored flow with.
    # Measured on synthetic TV-L1 planes: RMS error 0.17 levels (max 3) for 9% more bytes than
    # q90 (0.21, max 4); q100 costs 38% more for 0.12.
    flow_jpeg_quality: int = 95
    short_side: int | None = None
    flow: str = "tvl1"
    flow_options: dict[str, Any] = field(default_factory=dict)  # passed to make_backend (device, batch)
    # One flow worker process per entry (e.g. "cuda:0", "cuda:0", "cuda:1"), batching pairs across
    # videos (preprocess/flow_workers.py); empty: every CPU worker computes its own videos' flow.
    flow_devices: tuple[str, ...] = ()
    extra_params: dict[str, Any] = field(default_factory=dict)  # e.g. the synthetic generator's

    def __post_init__(self):
        for name in ("jpeg_quality", "flow_jpeg_quality"):
            if not 1 <= getattr(self, name) <= 100:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1..100, got {getattr(self, name)}")
        if self.workers < 1 or self.videos_per_shard < 1:
            raise ConfigError("--workers and --videos-per-shard must be >= 1")
        if self.short_side is not None and self.short_side < 8:
            raise ConfigError(f"--short-side must be >= 8 pixels, got {self.short_side}")


def _flow_params(options: PackOptions) -> dict[str, Any]:
    try:
        backend = make_backend(options.flow, **options.flow_options)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"flow backend {options.flow!r}: {err}") from None
    return {"backend": backend.name, **({"params": backend.params()} if backend.name != "none" else {})}


def run_params(index: DatasetIndex, options: PackOptions) -> dict[str, Any]:
    """Everything that determines the shards' bytes: compared on resume, stored in the manifest."""
    return {
        "dataset": index.dataset,
        "source_root": str(Path(index.root).resolve()),
        "num_source_videos": len(index.videos),
        # the shard plan depends on the exact video list: a changed list must not resume
        "source_videos_sha256": hashlib.sha256("\n".join(v.name for v in index.videos).encode()).hexdigest(),
        "videos_per_shard": options.videos_per_shard,
        "jpeg_quality": options.jpeg_quality,
        "flow_jpeg_quality": options.flow_jpeg_quality,
        "short_side": options.short_side,
        "flow": _flow_params(options),
        **index.params,
        **options.extra_params,
    }


def prepare_out(out: Path, params: dict[str, Any]) -> None:
    """Create `out`, refuse one made with other parameters, record ours before any shard."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        recorded = out / PARAMS_NAME
        # looked at before params.json: parts sharing --out write params.json before any shard, so
        # a shard seen here implies a params.json seen below
        finished = manifest_path(out).exists() or any(out.glob("shard-*.h5"))
        if recorded.exists():
            old = json.loads(recorded.read_text())
            if old != params:
                changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
                raise ConfigError(
                    f"{out} was packed with other parameters (differing: {', '.join(changed)}; see {recorded}). "
                    "Rerun with the same arguments to resume, or choose another --out."
                )
        elif finished:
            raise ConfigError(f"{out} holds shards but no {PARAMS_NAME}: not ours to resume; choose another --out")
        write_json_atomic(recorded, params)
    except OSError as err:  # unwritable, a file in the way, a read-only mount
        raise ConfigError(f"cannot write to the output directory {out}: {err}") from None


# ---- one worker -------------------------------------------------------------------------------

_worker_backend: FlowBackend | None = None


def _init_worker(flow: str, flow_options: dict[str, Any], pooled: bool = False) -> None:
    global _worker_backend
    cv2.setNumThreads(1)  # parallelism is across videos; OpenCV's pool would oversubscribe
    _worker_backend = None if flow == "none" else make_backend(flow, **flow_options)
    if pooled and "torch" in sys.modules:  # a torch backend on the CPU: one thread per worker too
        sys.modules["torch"].set_num_threads(1)


def encode_video(src: SourceVideo, options: PackOptions, backend: FlowBackend | None,
                 gray_sink: list[np.ndarray] | None = None) -> EncodedVideo:
    """Decode, JPEG-encode every frame, compute and encode flow. Raises VideoDecodeError.
    With `gray_sink` (and no backend) the grey frames go there for a flow worker instead."""
    params = [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality]
    chunk = max(FLOW_CHUNK, int(options.flow_options.get("batch") or 0) + 1)
    rgb: list[bytes] = []
    flow: list[tuple[bytes, bytes]] = []
    pending: list[np.ndarray] = []  # grayscale frames whose flow is not computed yet

    def flush(keep_last: bool) -> None:
        if len(pending) > 1:
            flow.extend(encode_flow(backend.compute(np.stack(pending)), options.flow_jpeg_quality))
        del pending[: len(pending) - 1 if keep_last else len(pending)]

    height = width = 0
    fps, frames = open_video(src.path, options.short_side)  # one capture gives the frames and the fps
    for frame in frames:
        ok, buf = cv2.imencode(".jpg", frame, params)
        if not ok:
            raise VideoDecodeError(f"{src.path}: OpenCV could not JPEG-encode frame {len(rgb)}")
        rgb.append(buf.tobytes())
        height, width = frame.shape[:2]
        if backend is not None:
            pending.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
            if len(pending) > chunk:
                flush(keep_last=True)
        elif gray_sink is not None:
            gray_sink.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    if backend is not None:
        flush(keep_last=False)
    record = VideoRecord(src.name, src.class_name, src.label, src.group, len(rgb), fps, height, width)
    return EncodedVideo(record, rgb, flow if backend is not None else None)


def _work(task: tuple[SourceVideo, PackOptions]) -> EncodedVideo | FailedVideo:
    src, options = task
    try:
        return encode_video(src, options, _worker_backend)
    except (VideoDecodeError, cv2.error) as err:
        return FailedVideo(src.name, src.path, str(err))


def _decode_work(task: tuple[SourceVideo, PackOptions]) -> tuple[EncodedVideo, np.ndarray] | FailedVideo:
    """A CPU worker's part when flow workers compute the flow: the video and its grey frames."""
    src, options = task
    gray: list[np.ndarray] = []
    try:
        encoded = encode_video(src, options, None, gray_sink=gray)
    except (VideoDecodeError, cv2.error) as err:
        return FailedVideo(src.name, src.path, str(err))
    return encoded, (np.stack(gray) if gray else np.zeros((0, 1, 1), np.uint8))


# ---- the run ----------------------------------------------------------------------------------

def plan_shards(index: DatasetIndex, per_shard: int) -> list[list[SourceVideo]]:
    return [index.videos[i : i + per_shard] for i in range(0, len(index.videos), per_shard)]


def _complete_shard(path: Path, planned: list[SourceVideo]) -> tuple[list[VideoRecord], list[FailedVideo]] | None:
    """The header of a finished shard holding exactly the planned videos, else None (redo it)."""
    if not path.exists():
        return None
    try:
        records, failed = read_shard_header(path)
    except (OSError, LayoutError, KeyError, ValueError):
        return None
    names = sorted([r.name for r in records] + [f.name for f in failed])
    return (records, failed) if names == sorted(v.name for v in planned) else None


def shard_entry(path: Path, records: list[VideoRecord]) -> dict[str, Any]:
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "num_videos": len(records),
        "num_frames": sum(r.num_frames for r in records),
        "bytes": path.stat().st_size,
    }


def pack_shards(index: DatasetIndex, options: PackOptions, owns: Callable[[int], bool] = lambda shard: True,
                progress: Progress | None = None) -> tuple[dict[str, Any], dict[int, ShardContent]]:
    """Pack the shards `owns` selects (all by default; `parts` selects 1/N of them) into
    options.out, keeping complete ones. Returns the run's params and {shard index: content}."""
    out = Path(options.out)
    params = run_params(index, options)
    prepare_out(out, params)
    plan = plan_shards(index, options.videos_per_shard)
    mine = [i for i in range(len(plan)) if owns(i)]
    done = {i: h for i in mine if (h := _complete_shard(out / shard_name(i), plan[i])) is not None}
    todo = [i for i in mine if i not in done]
    progress = progress or Progress.auto()
    progress.start(total_videos=sum(len(plan[i]) for i in todo), kept_shards=len(done), total_shards=len(mine))

    tasks = [(src, options) for i in todo for src in plan[i]]
    with_flow = options.flow != "none"
    if with_flow and options.flow_devices and tasks:
        # CPU workers decode and encode RGB; flow workers batch pairs across videos on the devices
        pool = multiprocessing.get_context("spawn").Pool(options.workers, _init_worker, ("none", {}, True))
        results = run_with_flow_workers(tasks, options, _decode_work, pool)
    elif options.workers == 1 or len(tasks) <= 1:
        _init_worker(options.flow, options.flow_options)
        results = map(_work, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(
            min(options.workers, len(tasks)), _init_worker, (options.flow, options.flow_options, True)
        )
        results = pool.imap(_work, tasks, chunksize=1)  # ordered: shards complete in order
    try:
        for i in todo:
            encoded, failed = [], []
            for _ in plan[i]:
                result = next(results)
                if isinstance(result, FailedVideo):
                    failed.append(result)
                    progress.failed(result)
                else:
                    encoded.append(result)
                    progress.video_done(result.record.num_frames)
            records = write_shard(out / shard_name(i), i, encoded, failed, with_flow=with_flow)
            done[i] = (records, failed)
            progress.shard_done(i)
    finally:
        getattr(results, "close", lambda: None)()  # the flow workers' generator stops its processes
        if pool is not None:
            pool.terminate()
            pool.join()
        progress.stop()
    return params, {i: done[i] for i in mine}


def pack(index: DatasetIndex, options: PackOptions, progress: Progress | None = None) -> Manifest:
    """Pack `index` into options.out (see the module docstring). Returns the manifest written."""
    params, done = pack_shards(index, options, progress=progress)
    return write_manifest(Path(options.out), index, params, [done[i] for i in range(len(done))])


def write_manifest(out: Path, index: DatasetIndex, params: dict[str, Any], shards: list[ShardContent],
                   entries: list[dict[str, Any]] | None = None) -> Manifest:
    """The manifest of complete shards; `entries` (sha256, sizes) are computed unless given."""
    records = [r for recs, _ in shards for r in recs]
    failed = [f for _, fails in shards for f in fails]
    packed = {r.name for r in records}
    splits = {k: {s: [n for n in names if n in packed] for s, names in subsets.items()}
              for k, subsets in index.splits.items()}
    if entries is None:
        entries = [shard_entry(out / shard_name(i), recs) for i, (recs, _) in enumerate(shards)]
    manifest = Manifest(index.dataset, params, index.classes, entries, records, splits, failed, LAYOUT_VERSION)
    write_json_atomic(manifest_path(out), manifest.to_dict())
    return manifest
