"""The packing run: source videos -> RGB JPEG frames + quantised flow -> HDF5 shards + manifest.

Deterministic: videos sorted by name go to shards of `videos_per_shard` in order (failed videos
keep their slot), so a shard's content never depends on the worker count or on what ran before.
Resumable: parameters are written to `params.json` before any shard; each finished shard's sha256
is recorded in `packed.json` just before it takes its final name. A rerun with the same parameters
keeps a shard only if its sha256 still matches the recorded one and its header lists the planned
videos, and says why it rebuilds any other (a damaged shard is rebuilt, never laundered into the
manifest); a rerun with other parameters is refused. The manifest is written last, atomically, so
a directory with a manifest is a finished dataset (docs/design.md, Storage).

One writer: the run holds `OUT/.lock` (preprocess/hygiene.py); a second run on the same --out is a
ConfigError (exit 2). The parts of a split run (preprocess/parts.py) share `.lock` with each other,
and each holds its own lock and records its shards' sha256 in its own file under `OUT/parts/`.
A full disk or an unwritable --out is an OutputError (exit 2): one line, the finished shards
kept, and the same command resumes once there is room.

Workers are spawned processes (never forked: a flow backend may hold CUDA state, and forking
OpenCV's thread pool can deadlock); each builds its own flow backend, or, with
`PackOptions.flow_devices`, decodes only and hands its grey frames to the flow workers
(preprocess/flow_workers.py), which batch pairs across videos on the GPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from preprocess.datasets import DatasetIndex, SourceVideo
from preprocess.flow import FlowBackend, encode_flow, make_backend
from preprocess.flow_workers import describe_flow_workers, run_with_flow_workers
from preprocess.hygiene import (OutputDirError, die_with_parent, exclusive_dir, worker_pool,
                                remove_temporaries)
from preprocess.progress import Progress
from preprocess.schema import (
    LAYOUT_VERSION,
    FailedVideo,
    LayoutError,
    Manifest,
    VideoRecord,
    load_manifest,
    manifest_path,
    read_json,
    shard_name,
    write_json_atomic,
)
from preprocess.shards import EncodedVideo, file_sha256, read_shard_header, shard_entry, write_shard
from preprocess.video import VideoDecodeError, open_video

PARAMS_NAME = "params.json"
PACKED_NAME = "packed.json"  # {shard file name: sha256} of the shards this run finished
EXIT_OK, EXIT_SOME_FAILED, EXIT_CONFIG = 0, 3, 2
FLOW_CHUNK = 64  # frames per flow call: bounds a worker's memory on long videos
ShardContent = tuple[list[VideoRecord], list[FailedVideo]]  # a shard's records and failed videos


class ConfigError(RuntimeError):
    """Bad arguments or an output directory that cannot be used; nothing was written."""


class OutputError(ConfigError):
    """The output could not be written (disk full, unwritable); finished shards are kept and a rerun
    resumes. Exit status 2, like a configuration error."""


@contextlib.contextmanager
def locked_out(out: str | Path, part_lock: str | None = None):
    """Hold --out's lock (created if missing): a second run on it is a ConfigError. With `part_lock`
    (a lock file's path under `out`, one per part of a split run): --out's lock is shared with the
    other parts, never with a whole run, and the part's own is exclusive."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_dir(out, "cvtcl-preprocess run", shared=part_lock is not None))
            if part_lock is not None:
                stack.enter_context(exclusive_dir(out, "cvtcl-preprocess run of this part", name=part_lock))
        except OutputDirError as err:  # busy, unwritable, a file in the way, a read-only mount
            raise ConfigError(str(err)) from None
        # a whole run (or merge) is the only writer: a killed run's shard temporaries go too
        remove_temporaries(out, ("shard-*.h5.tmp",) if part_lock is None else ())
        yield


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
        _flow_params(self)  # the flow options too, before the output directory is touched


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
            old = read_json(recorded, "it records the parameters this output was packed with: restore it, "
                                      "or choose another --out")
            # a synthetic dataset's source is always OUT/raw: an output moved elsewhere is the same
            moved = {"source_root"} if params.get("dataset") == "synthetic" else set()
            changed = sorted(k for k in (set(old) | set(params)) - moved if old.get(k) != params.get(k))
            if changed:
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
    if pooled:
        die_with_parent(multiprocessing.parent_process().pid)  # a killed run leaves no worker behind
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
    if (backend is not None or gray_sink is not None) and len(rgb) == 1:
        raise VideoDecodeError(f"{src.path}: a single frame decoded, so it has no optical flow (flow needs two)")
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


def _complete_shard(path: Path, planned: list[SourceVideo], recorded: str | None,
                    log) -> tuple[list[VideoRecord], list[FailedVideo]] | None:
    """The header of a finished shard holding exactly the planned videos whose sha256 is the one
    recorded when it was written, else None (redo it, saying why when a file is there)."""
    if not path.exists():
        return None
    if recorded is None:
        log(f"{path.name}: no sha256 recorded for it in {PACKED_NAME} (an older cvtcl, or killed before "
            "recording it): rebuilding it")
        return None
    if file_sha256(path) != recorded:
        log(f"{path.name}: sha256 differs from the one recorded when it was written (damaged?): rebuilding it")
        return None
    try:
        records, failed = read_shard_header(path)
    except (OSError, LayoutError, KeyError, ValueError) as err:
        log(f"{path.name}: header unreadable ({err}): rebuilding it")
        return None
    names = sorted([r.name for r in records] + [f.name for f in failed])
    if names != sorted(v.name for v in planned):
        log(f"{path.name}: holds other videos than planned: rebuilding it")
        return None
    return records, failed


def _read_packed(out: Path) -> dict[str, str]:
    """The recorded sha256 of each finished shard: the union of `packed.json` and the parts' records
    (parts write concurrently, one file each; records agree, shards being deterministic), else a
    finished dataset's manifest (a copy that left them behind). Unreadable records count as none:
    those shards are rebuilt."""
    found: dict[str, str] = {}
    try:  # a split run's parts record theirs one directory down (preprocess/parts.py)
        for path in sorted([*out.glob(PACKED_NAME), *out.glob(f"*/{Path(PACKED_NAME).stem}-*.json")]):
            data = json.loads(path.read_text())
            found.update(data if isinstance(data, dict) else {})
        if not found and manifest_path(out).exists():
            found = {e["file"]: e["sha256"] for e in load_manifest(out).shards}
    except (OSError, ValueError, LayoutError):  # JSONDecodeError is a ValueError
        return {}
    return found


def pack_shards(index: DatasetIndex, options: PackOptions, owns: Callable[[int], bool] = lambda shard: True,
                progress: Progress | None = None, record: str = PACKED_NAME
                ) -> tuple[dict[str, Any], dict[int, ShardContent], dict[str, str]]:
    """Pack the shards `owns` selects (all by default; `parts` selects 1/N of them) into
    options.out, keeping complete ones whose recorded sha256 still matches; this run's sha256s go
    to `record` (a path under options.out). The caller holds `locked_out`. Returns the run's
    params, {shard index: content} and {shard file: recorded sha256}."""
    out = Path(options.out)
    params = run_params(index, options)
    prepare_out(out, params)
    try:
        return (params, *_pack_shards(index, options, out, owns, progress or Progress.auto(), out / record))
    except OSError as err:  # ENOSPC, EACCES, EROFS while writing a shard or a record
        kept = len(_read_packed(out))
        if err.filename and not Path(err.filename).resolve().is_relative_to(out.resolve()):  # a source video
            verb, fix = ("read", "its permissions") if isinstance(err, PermissionError) else ("use", "that")
            raise OutputError(f"cannot {verb} {err.filename}: {err.strerror or err}; {kept} finished shard(s) kept. "
                              f"Fix {fix} and rerun the same command to resume") from None
        raise OutputError(
            f"cannot write to {out}: {err.strerror or err} ({err.filename or 'shard'}); {kept} finished "
            "shard(s) kept. Free space (or fix permissions) and rerun the same command to resume"
        ) from None


def _pack_shards(index: DatasetIndex, options: PackOptions, out: Path, owns: Callable[[int], bool],
                 progress: Progress, record_path: Path) -> tuple[dict[int, ShardContent], dict[str, str]]:
    plan = plan_shards(index, options.videos_per_shard)
    mine = [i for i in range(len(plan)) if owns(i)]
    recorded = _read_packed(out)
    packed = {}  # this run's record: the kept shards' and the written shards' sha256
    done = {}
    for i in mine:
        name = shard_name(i)
        header = _complete_shard(out / name, plan[i], recorded.get(name), progress.log)
        if header is not None:
            done[i], packed[name] = header, recorded[name]
    todo = [i for i in mine if i not in done]
    progress.start(total_videos=sum(len(plan[i]) for i in todo), kept_shards=len(done), total_shards=len(mine))
    record_path.parent.mkdir(exist_ok=True)
    write_json_atomic(record_path, packed)  # forget the records of shards being redone

    tasks = [(src, options) for i in todo for src in plan[i]]
    with_flow = options.flow != "none"
    with contextlib.ExitStack() as workers:
        if with_flow and options.flow_devices and tasks:
            # CPU workers decode and encode RGB; flow workers batch pairs across videos on the devices
            progress.log(describe_flow_workers(options.flow, options.flow_devices, options.flow_options))
            pool = workers.enter_context(worker_pool(options.workers, _init_worker, ("none", {}, True), "decoding"))
            results = run_with_flow_workers(tasks, options, _decode_work, pool)
        elif options.workers == 1 or len(tasks) <= 1:
            _init_worker(options.flow, options.flow_options)
            results = map(_work, tasks)
        else:
            pool = workers.enter_context(worker_pool(min(options.workers, len(tasks)), _init_worker,
                                                     (options.flow, options.flow_options, True), "packing"))
            results = pool.map(_work, tasks)  # ordered: shards complete in order
        _write_shards(out, plan, todo, results, packed, done, record_path, with_flow, progress)
    return {i: done[i] for i in mine}, packed


def _write_shards(out: Path, plan: list, todo: list[int], results: Iterator, packed: dict[str, str],
                  done: dict, record_path: Path, with_flow: bool, progress: Progress) -> None:
    """Write the shards `todo` from the encoded videos `results` (in task order), recording each."""
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
            name = shard_name(i)

            def record(sha256: str) -> None:
                write_json_atomic(record_path, {**packed, name: sha256})
                packed[name] = sha256

            records = write_shard(out / name, i, encoded, failed, with_flow=with_flow, record_sha256=record)
            done[i] = (records, failed)
            progress.shard_done(i)
    finally:
        getattr(results, "close", lambda: None)()  # the flow workers' generator stops its processes
        progress.stop()


def pack(index: DatasetIndex, options: PackOptions, progress: Progress | None = None) -> Manifest:
    """Pack `index` into options.out (see the module docstring). Returns the manifest written."""
    out = Path(options.out)
    with locked_out(out):
        params, done, packed = pack_shards(index, options, progress=progress)
    shards = [done[i] for i in range(len(done))]
    entries = [shard_entry(out / shard_name(i), recs, packed[shard_name(i)]) for i, (recs, _) in enumerate(shards)]
    return write_manifest(out, index, params, shards, entries)


def write_manifest(out: Path, index: DatasetIndex, params: dict[str, Any], shards: list[ShardContent],
                   entries: list[dict[str, Any]] | None = None) -> Manifest:
    """The manifest of complete shards; `entries` (sha256, sizes, index checksums) are computed
    unless given."""
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
