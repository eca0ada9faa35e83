"""`cvtcl-preprocess verify DIR`: re-read a packed dataset end to end and list every problem.

Checks, per shard in the manifest: the file exists, its size, sha256 and index crc32 match, its
header lists the manifest's videos (counts and offsets), the offset and checksum tables are
consistent, and every RGB frame and every flow plane matches its crc32 and decodes as a JPEG of
the recorded size. Then the split lists must name packed videos only. A malformed manifest is one
problem naming the file and the field. `--part I/N` checks that part's shards only: against the
manifest once merged, else against the part's marker (so each array task can verify its own
shards before `merge`). A problem is a string naming the file (and video / frame); none means the
dataset is sound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from preprocess.hygiene import die_with_parent_if_child, worker_pool
from preprocess.pack import ConfigError
from preprocess.parts import Part, read_marker, read_params
from preprocess.schema import LayoutError, VideoRecord, load_manifest, manifest_path
from preprocess.shards import (file_sha256, first_bad_crc, index_crc32, open_shard, read_frames, read_shard_header,
                               record_mismatch)


def _check_offsets(h5: h5py.File, modality: str, frames: int, where: str) -> list[str]:
    if modality not in h5:
        return [f"{where}: no {modality} group"]
    offsets, blob = h5[modality]["offsets"], h5[modality]["bytes"]
    if offsets.shape != (frames + 1,):
        return [f"{where}: {modality}/offsets has {offsets.shape[0]} entries, expected {frames + 1}"]
    if "crc32" not in h5[modality] or h5[modality]["crc32"].shape != (frames,):
        return [f"{where}: {modality}/crc32 is missing or does not have {frames} entries"]
    values = offsets[()]
    if values[0] != 0 or np.any(np.diff(values) <= 0) or values[-1] != blob.shape[0]:
        return [f"{where}: {modality}/offsets are not increasing from 0 to the blob size {blob.shape[0]}"]
    return []


def _decode_all(h5: h5py.File, modality: str, video: VideoRecord, where: str) -> list[str]:
    """Check every frame (RGB) or plane (flow) of one video against its crc32 and decode it;
    report the first bad one, named as the loaders name it (`video V flow-y frame 7`)."""
    channels = 3 if modality == "rgb" else 1
    first = video.rgb_start if modality == "rgb" else 2 * video.flow_start
    count = video.num_frames if modality == "rgb" else 2 * video.num_flow_frames
    if count == 0:
        return []
    frames = read_frames(h5[modality]["bytes"], h5[modality]["offsets"][first : first + count + 1])

    def name(i: int) -> str:
        return f"video {video.name} rgb frame {i}" if modality == "rgb" else \
            f"video {video.name} flow-{'xy'[i % 2]} frame {i // 2}"

    bad = first_bad_crc(frames, h5[modality]["crc32"][first : first + count])
    if bad is not None:
        return [f"{where}: {name(bad)} fails its checksum (damaged bytes)"]
    flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
    expected = (video.height, video.width) + ((3,) if channels == 3 else ())
    for i, buf in enumerate(frames):
        image = cv2.imdecode(buf, flag)
        if image is None or image.shape != expected:
            got = "undecodable" if image is None else f"shape {image.shape}"
            return [f"{where}: {name(i)} is {got}, expected {expected}"]
    return []


def check_shard(root: str, entry: dict[str, Any], videos: list[VideoRecord], with_flow: bool) -> list[str]:
    """Every problem of one shard (see the module docstring)."""
    path = Path(root) / entry["file"]
    where = str(path)
    if not path.is_file():
        return [f"{where}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{where}: {size} bytes, manifest says {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{where}: sha256 differs from the manifest (damaged or rewritten)")
    try:
        if index_crc32(path, entry["data_regions"]) != entry["index_crc32"]:
            # as the loaders do: HDF5 does not parse damaged metadata, whose errors (json's
            # "Expecting ':' delimiter", h5py's) would only restate this problem, less clearly
            problems.append(f"{where}: its index (HDF5 metadata, offsets or checksums) differs from the manifest's "
                            "index_crc32 (damaged), its videos were not read")
            return problems
        header, _ = read_shard_header(path)
        mismatch = record_mismatch(videos, header)
        if mismatch:
            problems.append(f"{where}: manifest and shard disagree: {mismatch}")
        frames = sum(v.num_frames for v in videos)
        if len(videos) != entry["num_videos"] or frames != entry["num_frames"]:
            problems.append(f"{where}: video/frame counts differ from the manifest's shard entry")
        with open_shard(path) as h5:
            layout = _check_offsets(h5, "rgb", frames, where)
            if with_flow:
                layout += _check_offsets(h5, "flow", 2 * sum(v.num_flow_frames for v in videos), where)
            problems += layout
            if not layout:
                for video in videos:
                    problems += _decode_all(h5, "rgb", video, where)
                    if with_flow:
                        problems += _decode_all(h5, "flow", video, where)
    except LayoutError as err:  # says what is damaged, naming the file
        problems.append(str(err))
    except (OSError, KeyError, ValueError) as err:
        problems.append(f"{where}: cannot be read ({' '.join(str(err).split())})")
    return problems


def _check_task(args) -> list[str]:
    return check_shard(*args)


def _part_tasks(root: Path, part: Part) -> list[tuple]:
    """Check tasks of one part's shards before `merge`: from its marker (no manifest yet)."""
    params = read_params(root)
    with_flow = params.get("flow", {}).get("backend", "none") != "none"
    shards = read_marker(root, part, params)
    return [(str(root), entry, records, with_flow) for _, (entry, (records, _)) in sorted(shards.items())]


def verify(root: str | Path, workers: int = 1, part: Part | None = None) -> list[str]:
    """All problems of the dataset at `root` (of `part`'s shards only, with or without a manifest);
    an empty list means it is sound."""
    root = Path(root)
    if part is not None and not manifest_path(root).exists():
        try:
            return _run(_part_tasks(root, part), workers)
        except (ConfigError, LayoutError) as err:  # not complete, or its marker damaged: a problem found
            return [str(err)]
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, LayoutError) as err:
        return [str(err)]
    by_shard: dict[int, list[VideoRecord]] = {}
    for video in manifest.videos:
        by_shard.setdefault(video.shard, []).append(video)
    tasks = [(str(root), entry, by_shard.get(i, []), manifest.has_flow) for i, entry in enumerate(manifest.shards)
             if part is None or part.owns(i)]
    problems = _run(tasks, workers)
    if part is not None:
        return problems  # the checks below are of the whole dataset
    unknown_shards = sorted(set(by_shard) - set(range(len(manifest.shards))))
    if unknown_shards:
        problems.append(f"{root}: videos refer to shards {unknown_shards} that the manifest does not list")
    packed = {v.name for v in manifest.videos}
    for split, subsets in manifest.splits.items():
        for subset, names in subsets.items():
            stray = [n for n in names if n not in packed]
            if stray:
                problems.append(f"{root}: split {split} {subset} names {len(stray)} unpacked video(s), e.g. {stray[0]}")
    return problems


def _run(tasks: list[tuple], workers: int) -> list[str]:
    if workers > 1 and len(tasks) > 1:
        with worker_pool(min(workers, len(tasks)), die_with_parent_if_child, (), "verify") as pool:
            results = list(pool.map(_check_task, tasks))
    else:
        results = [_check_task(t) for t in tasks]
    return [p for r in results for p in r]
