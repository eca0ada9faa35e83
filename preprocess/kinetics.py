"""Indexing Kinetics-400 in its official layout: which clips, which class, which split.

`cvtcl-preprocess kinetics400 --root DIR --annotations ANN`:
    ANN/train.csv, ANN/validate.csv             label,youtube_id,time_start,time_end,split[,is_cc]
    ANN/test.csv (optional; may lack `label`)   (CVDF's copy names the second one val.csv: accepted)
    DIR/**/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4   (also .mkv / .webm)
  The videos may sit in class folders (`train/abseiling/...`), in split folders, or flat: the
  tree is walked once and a clip is found by its file name alone, wherever it is. A clip found
  twice resolves to the copy under a `replacement*` folder (CVDF's replacements for corrupted
  clips), else to the first in sorted order, the same on every machine.

Classes are the CSV labels, sorted (400 for K400). A clip listed in a CSV but absent on disk (a
real copy misses several percent: removed or private YouTube videos) is kept in the index with a
path that does not exist, so packing records it as a failed video with the reason; a broken
download fails the same way when it does not decode.

Kinetics has no source groups (each clip is cut from its own YouTube video), so the group is the
video itself; the manifest says so in `params["source_groups"]`.

Splits (the manifest's `split id -> subset -> names`):
  "1":        train = train.csv, test = validate.csv: the split the literature evaluates on
              (the test labels were withheld when K400 was released), and the one the trainer and
              `cvtcl.eval --split 1` read by default.
  "official": train / validate / test as the three CSVs name them (test: labelled rows only).
Rows without a label (test.csv as first released) are not packed: no stage and no evaluation
uses unlabelled test clips; their count is recorded in `params["unlabelled_rows_skipped"]`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from preprocess.datasets import DatasetError, DatasetIndex, SourceVideo

CSV_NAMES = {"train": ("train.csv",), "validate": ("validate.csv", "val.csv"), "test": ("test.csv",)}
REQUIRED_CSVS = ("train", "validate")
COLUMNS = ("youtube_id", "time_start", "time_end")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")  # what youtube-dl / yt-dlp downloads produce
SOURCE_GROUPS = "none: each Kinetics clip comes from its own YouTube video, so the group is the video itself"


def clip_name(youtube_id: str, start: int, end: int) -> str:
    """The official file stem: `<youtube_id>_<start:06d>_<end:06d>`."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


def _find_videos(root: Path) -> dict[str, str]:
    """stem -> path of every video file below `root` (a clip found twice: see the module docstring).
    Linked folders are searched too (a download linked into the tree), each real folder once."""
    found: dict[str, str] = {}
    replacements: dict[str, str] = {}
    searched: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        if (real := os.path.realpath(folder)) in searched:  # a link back up the tree, or two links to one folder
            dirs.clear()
            continue
        searched.add(real)
        dirs.sort()
        chosen = replacements if "replacement" in Path(folder).relative_to(root).as_posix() else found
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in VIDEO_SUFFIXES:
                chosen.setdefault(stem, os.path.join(folder, name))
    return found | replacements


def _read_csv(path: Path, subset: str) -> list[tuple[str, str | None]]:
    """(clip name, label or None) per row of one official CSV; a missing column names the file."""
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Excel, pandas) is no header
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        needed = COLUMNS + (() if subset == "test" else ("label",))
        missing = [c for c in needed if c not in header]
        if missing:
            raise DatasetError(f"{path}: no column {', '.join(missing)} (header: {','.join(header)}); "
                               "expected the official label,youtube_id,time_start,time_end,split")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                name = clip_name(row["youtube_id"], int(row["time_start"]), int(row["time_end"]))
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{line}: time_start/time_end must be whole seconds, got "
                                   f"{row.get('time_start')!r}, {row.get('time_end')!r}") from None
            rows.append((name, (row.get("label") or "").strip() or None))
    return rows


def index_kinetics400(root: str | Path, annotations: str | Path) -> DatasetIndex:
    """Index an official Kinetics-400 copy (see the module docstring)."""
    root, annotations = Path(root), Path(annotations)
    if not root.is_dir():
        raise DatasetError(f"Kinetics-400 video folder (--root) not found: {root}")
    if not annotations.is_dir():
        raise DatasetError(f"Kinetics-400 annotation folder (--annotations) not found: {annotations}")
    rows: dict[str, list[tuple[str, str | None]]] = {}
    for subset, names in CSV_NAMES.items():
        path = next((annotations / n for n in names if (annotations / n).is_file()), None)
        if path is not None:
            rows[subset] = _read_csv(path, subset)
        elif subset in REQUIRED_CSVS:
            raise DatasetError(f"Kinetics-400 annotation file not found: {annotations / names[0]}")

    classes = sorted({label for listed in rows.values() for _, label in listed if label is not None})
    if not classes:
        raise DatasetError(f"{annotations / 'train.csv'}: no labelled row")
    label_of = {c: i for i, c in enumerate(classes)}
    found = _find_videos(root)
    videos: dict[str, SourceVideo] = {}
    members: dict[str, list[str]] = {}
    unlabelled = duplicates = 0
    for subset, listed in rows.items():
        members[subset] = []
        for name, label in listed:
            if label is None:
                unlabelled += 1
                continue
            if name in videos:  # listed twice: the first row keeps it, no clip sits in two subsets
                duplicates += 1
                continue
            # absent on disk: a path that does not exist, which packing records as failed
            path = found.get(name, str(root / f"{name}{VIDEO_SUFFIXES[0]}"))
            videos[name] = SourceVideo(name, path, label, label_of[label], name)
            members[subset].append(name)
    if videos and not any(name in found for name in videos):  # a wrong or unmounted --root: not a run of failures
        example = next(iter(videos))
        raise DatasetError(f"none of the {len(videos)} labelled clips the CSVs list is under --root {root} (such as "
                           f"{example}{VIDEO_SUFFIXES[0]}, in any folder below it); check the path, or that the "
                           "download is mounted on this machine")
    del found  # 300 k paths: not needed past this point
    splits = {
        "1": {"train": sorted(members["train"]), "test": sorted(members["validate"])},
        "official": {subset: sorted(names) for subset, names in members.items()},
    }
    params = {"source_groups": SOURCE_GROUPS, "unlabelled_rows_skipped": unlabelled,
              "duplicate_rows_skipped": duplicates}
    return DatasetIndex("kinetics400", str(root), classes, list(videos.values()), splits, params)
