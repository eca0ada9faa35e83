"""Split preprocessing for cluster schedulers: `--part I/N` packs 1/N of the shards, `merge`
writes the manifest once every part is complete (docs/design.md, Storage).

Part I of N (0-based: I = 0 .. N-1, as SLURM_ARRAY_TASK_ID of `--array=0-(N-1)` and Kubernetes'
JOB_COMPLETION_INDEX count) owns the shards whose index i has i % N == I. Strided rather than in
blocks: a block of consecutive names can be unusually long or short videos (or a run of missing
downloads), a stride spreads them over every part.

All parts write into one `--out` on a shared file system. Shards are disjoint, so no two parts
write one file; params.json (identical for every part) is written through a per-writer temporary
name. A part is resumable exactly like a whole run (complete shards are kept). When its shards
are complete it writes `OUT/parts/part-IIIII-of-NNNNN.json`: the run's params and, per shard, the
manifest entry (sha256 computed by the part, on its own machine) and the header's records; plus
`OUT/parts/index.json` (classes and splits, which the manifest needs and OUT alone cannot give).
`merge` reads only these small files and the shards' sizes, so it takes seconds for thousands of
shards, and writes the manifest that a one-process run writes, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.datasets import DatasetIndex
from preprocess.hygiene import remove_temporaries
from preprocess.pack import (
    PACKED_NAME, PARAMS_NAME, ConfigError, PackOptions, ShardContent, locked_out, pack_shards, prepare_out, run_params, shard_entry,
    write_manifest,
)
from preprocess.progress import Progress
from preprocess.schema import FailedVideo, Manifest, VideoRecord, read_json, shard_name, write_json_atomic

PARTS_DIR = "parts"
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based) of `count`: the shards i with i % count == index."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        """`I/N` -> Part; a clear error for anything else (a 1-based I = N included)."""
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/8 (part 0 of 8)") from None
        if count < 1:
            raise ValueError(f"--part {text}: N must be >= 1")
        if not 0 <= index < count:
            raise ValueError(
                f"--part {text}: I is 0-based and must be 0..{count - 1} (SLURM: --array=0-{count - 1} and "
                "--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; Kubernetes: $JOB_COMPLETION_INDEX)"
            )
        return cls(index, count)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def marker_name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}.json"


def marker_path(out: str | Path, part: Part) -> Path:
    return Path(out) / PARTS_DIR / part.marker_name


def _write_if_changed(path: Path, data: Any) -> None:
    try:
        if json.loads(path.read_text()) == data:
            return  # another part wrote it already
    except (OSError, ValueError):  # not there yet, or damaged: written anew
        pass
    write_json_atomic(path, data)


def pack_part(index: DatasetIndex, options: PackOptions, part: Part,
              progress: Progress | None = None) -> dict[int, ShardContent]:
    """Pack part `part` of `index` into options.out and record it as complete. Returns its shards."""
    label = part.marker_name.removesuffix(".json")
    # parts run side by side, the same part twice does not; each records its shards' sha256 in its own file
    with locked_out(options.out, f"{PARTS_DIR}/.lock-{label}"):
        remove_temporaries(Path(options.out) / PARTS_DIR)  # the JSON of killed parts (their pid gone)
        prepare_out(Path(options.out), run_params(index, options))  # refuses other params before the next line
        # a marker from an earlier run of this part must not let `merge` go ahead while it runs again
        marker_path(options.out, part).unlink(missing_ok=True)
        params, done, _ = pack_shards(index, options, part.owns, progress, f"{PARTS_DIR}/packed-{label}.json")
        record_part(Path(options.out), index, part, params, done)
    return done


def record_part(out: Path, index: DatasetIndex, part: Part, params: dict[str, Any],
                done: dict[int, ShardContent]) -> None:
    """Write the marker of a complete part (and the index that merge needs)."""
    (out / PARTS_DIR).mkdir(exist_ok=True)
    _write_if_changed(out / PARTS_DIR / INDEX_NAME,
                      {"dataset": index.dataset, "root": index.root, "classes": index.classes, "splits": index.splits})
    shards = [{"index": i, "entry": shard_entry(out / shard_name(i), records),
               "videos": [r.to_dict() for r in records], "failed": [f.to_dict() for f in failed]}
              for i, (records, failed) in done.items()]
    marker = {"part": part.index, "parts": part.count, "params": params, "shards": shards}
    write_json_atomic(marker_path(out, part), marker)


def num_shards(params: dict[str, Any]) -> int:
    return math.ceil(params["num_source_videos"] / params["videos_per_shard"])


def read_params(out: Path) -> dict[str, Any]:
    path = out / PARAMS_NAME
    if not path.is_file():
        raise ConfigError(f"{out}: no {PARAMS_NAME}; not a cvtcl-preprocess output "
                          f"(run the parts with --out {out} first)")
    return read_json(path, "restore it, or pack into a new --out")


def read_marker(out: Path, part: Part, params: dict[str, Any]) -> dict[int, tuple[dict[str, Any], ShardContent]]:
    """{shard: (manifest entry, (records, failed))} of a complete part; ConfigError when it is not."""
    path = marker_path(out, part)
    if not path.is_file():
        raise ConfigError(f"part {part} is not complete: no {path}; run (or resume) it with the same "
                          f"command and --part {part}")
    marker = read_json(path, f"delete it and rerun part {part} with the same command (its finished shards are kept)")
    if marker["params"] != params:
        raise ConfigError(f"{path} was written with other parameters than {out / PARAMS_NAME}; "
                          f"delete it and rerun part {part}")
    return {s["index"]: (s["entry"], ([VideoRecord.from_dict(v) for v in s["videos"]],
                                      [FailedVideo(**f) for f in s["failed"]]))
            for s in marker["shards"]}


def merge(out: str | Path) -> Manifest:
    """Check that every part of a split run is complete, then write the manifest (module docstring)."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory; give the --out of the parts")
    read_params(out)  # not a packing output: said before its lock file is made there
    with locked_out(out):  # exclusive: no part still writing
        remove_temporaries(out / PARTS_DIR)
        return _merge(out)


def _merge(out: Path) -> Manifest:
    params = read_params(out)
    counts = sorted({int(p.stem.split("-of-")[1]) for p in (out / PARTS_DIR).glob("part-*-of-*.json")})
    if not counts:
        raise ConfigError(f"{out}: no part has finished (no {out / PARTS_DIR}/part-*-of-*.json); run the parts first")
    if len(counts) > 1:
        raise ConfigError(f"{out / PARTS_DIR}: parts of runs split {counts} ways; keep the markers of one "
                          "split (delete the others) and rerun its parts")
    count = counts[0]
    shards: dict[int, tuple[dict[str, Any], ShardContent]] = {}
    missing = [str(Part(i, count)) for i in range(count) if not marker_path(out, Part(i, count)).is_file()]
    if missing:
        raise ConfigError(f"{out}: part(s) {', '.join(missing)} not complete (no marker in {out / PARTS_DIR}); "
                          "run them (an interrupted part resumes), then merge again")
    for i in range(count):
        shards.update(read_marker(out, Part(i, count), params))
    total = num_shards(params)
    if sorted(shards) != list(range(total)):
        raise ConfigError(f"{out / PARTS_DIR}: the markers cover shards {len(shards)} of {total}; rerun the parts")
    for i, (entry, _) in shards.items():
        path = out / shard_name(i)
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise ConfigError(f"{path}: missing or not the size its part recorded; rerun part {i % count}/{count}")
    saved = read_json(out / PARTS_DIR / INDEX_NAME, "rerun any part with the same command: it writes the file again")
    index = DatasetIndex(saved["dataset"], saved["root"], saved["classes"], [], saved["splits"])
    entries = [shards[i][0] for i in range(total)]
    write_json_atomic(out / PACKED_NAME, {e["file"]: e["sha256"] for e in entries})  # as a one-process run's
    return write_manifest(out, index, params, [shards[i][1] for i in range(total)], entries)
