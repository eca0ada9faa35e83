"""Indexing source datasets in their official layouts: which videos, which class, which source
group, which split (docs/design.md, Storage; the evaluation protocol of docs/algorithm.md uses split 1).

UCF101 (`--root DIR`):
    DIR/UCF-101/<Class>/v_<Class>_gXX_cYY.avi
    DIR/ucfTrainTestlist/classInd.txt          "1 ApplyEyeMakeup" (1-based ids)
    DIR/ucfTrainTestlist/trainlist0{1,2,3}.txt "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    DIR/ucfTrainTestlist/testlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
  The source group is `<Class>_gXX`: the clips of one group are cut from one recording, and the
  official splits keep groups on one side.
HMDB51 (`--root DIR --splits SPLITS`):
    DIR/<class>/<video>.avi
    SPLITS/<class>_test_split{1,2,3}.txt       "<video>.avi 1" (1 = train, 2 = test, 0 = unused)
  HMDB51 has no source groups; each video is its own group. Classes are sorted by name.
Kinetics-400: preprocess/kinetics.py.

Every missing root or split file is a `DatasetError` naming the path, raised before any work.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLIT_IDS = ("1", "2", "3")
_UCF_GROUP = re.compile(r"_g(\d+)_c(\d+)$")


class DatasetError(RuntimeError):
    """The source dataset is missing or not in the official layout; the message names the path."""


@dataclass(frozen=True, slots=True)  # slots: a Kinetics index holds 300 k of them
class SourceVideo:
    """One video to pack. `path` may not exist (listed in a split file only): packing records it as failed."""

    name: str
    path: str
    class_name: str
    label: int  # 0-based
    group: str


@dataclass
class DatasetIndex:
    """What to pack: videos sorted by name, classes in label order, official splits by id.
    `params`: facts about the dataset recorded in the manifest's params (e.g. how groups are formed)."""

    dataset: str
    root: str
    classes: list[str]
    videos: list[SourceVideo]
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.videos = sorted(self.videos, key=lambda v: v.name)
        dupes = sorted(n for n, k in Counter(v.name for v in self.videos).items() if k > 1)
        if dupes:
            raise DatasetError(f"{self.root}: video names must be unique, these repeat: {dupes[:5]}")
        for split, members in self.splits.items():  # a video on both sides would leak test into train
            seen: dict[str, str] = {}
            for subset, names in members.items():
                for name in names:
                    if name in seen:
                        where = f"twice in {subset}" if seen[name] == subset else f"in both {seen[name]} and {subset}"
                        raise DatasetError(f"{self.root}: split {split} lists {name} {where}; fix the split files")
                    seen[name] = subset


def _add(videos: dict[str, SourceVideo], video: SourceVideo) -> None:
    """videos[video.name] = video, unless another file already has that name: the manifest, the
    splits and the shards know a video by its name, so two would silently become one."""
    known = videos.setdefault(video.name, video)
    if known.path != video.path:
        raise DatasetError(f"{known.path} and {video.path}: two videos named {video.name}; names must be unique "
                           "across class folders: rename or remove one (and its split file lines)")


def _check_some_on_disk(videos: dict[str, SourceVideo], folder: Path) -> None:
    """Packing records a listed but absent video as failed; when not one of them is on disk, the
    root or the split files are wrong (a disk not mounted, another file extension): an error before
    any work, not an empty dataset."""
    if any(Path(v.path).is_file() for v in videos.values()):  # stops at the first one found
        return
    first = next(iter(videos.values())).path
    kinds = sorted({p.suffix for p in folder.glob("*/*") if p.is_file() and p.suffix})
    hint = f"; its class folders hold {', '.join(kinds)} files: name those in the split files" if kinds else ""
    raise DatasetError(f"none of the {len(videos)} videos the split files list is under {folder} (first: {first}){hint}")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _split_lines(path: Path) -> list[tuple[str, str, str | None]]:
    """('FILE:LINE', video file, the line's number or None) per non-empty line of a split file: the
    number is the last field when it is one, the file all before it (a file name may hold spaces)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line := line.strip():
            fields = re.fullmatch(r"(.+?)\s+(\d+)", line)
            out.append((f"{path}:{number}", *(fields.groups() if fields else (line, None))))
    return out


def index_ucf101(root: str | Path, dataset: str = "ucf101") -> DatasetIndex:
    """Index an official UCF101 tree (see the module docstring)."""
    root = Path(root)
    _require(root, "UCF101 root (--root)")
    videos_dir = _require(root / "UCF-101", "UCF101 video folder")
    lists = _require(root / "ucfTrainTestlist", "UCF101 split folder")
    class_ind = _require(lists / "classInd.txt", "UCF101 class list")

    ids = {}
    for fields in _lines(class_ind):
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(f"{class_ind}: expected lines '<id> <Class>', got {' '.join(fields)!r}")
        ids[fields[1]] = int(fields[0]) - 1
    classes = sorted(ids, key=ids.get)
    if [ids[c] for c in classes] != list(range(len(classes))):
        raise DatasetError(f"{class_ind}: class ids must be 1..{len(classes)} without gaps")

    def source(rel: str) -> SourceVideo:
        class_name, file_name = rel.split("/", 1) if "/" in rel else ("", rel)
        if class_name not in ids:
            raise DatasetError(f"{videos_dir / rel}: class {class_name!r} is not in {class_ind}")
        stem = Path(file_name).stem
        match = _UCF_GROUP.search(stem)
        if match is None:
            raise DatasetError(f"{videos_dir / rel}: name is not v_<Class>_gXX_cYY")
        return SourceVideo(stem, str(videos_dir / rel), class_name, ids[class_name], f"{class_name}_g{match[1]}")

    found: dict[str, SourceVideo] = {}
    for path in sorted(videos_dir.glob("*/*.avi")):
        _add(found, source(f"{path.parent.name}/{path.name}"))
    splits = {}
    for k in SPLIT_IDS:
        train, test = lists / f"trainlist0{k}.txt", lists / f"testlist0{k}.txt"
        if not train.exists() and not test.exists():
            continue
        members = {}
        for subset, path in (("train", _require(train, "UCF101 split file")), ("test", _require(test, "UCF101 split file"))):
            members[subset] = []
            for where, file, _ in _split_lines(path):
                try:
                    video = source(file)
                except DatasetError as err:
                    raise DatasetError(f"{where}: {err}") from None
                _add(found, video)  # listed but absent: packing records it as failed
                members[subset].append(video.name)
        splits[k] = {s: sorted(n) for s, n in members.items()}
    if not splits:
        raise DatasetError(f"no split files in {lists}: expected trainlist01.txt and testlist01.txt")
    if not found:
        raise DatasetError(f"no videos in {videos_dir}: expected <Class>/v_<Class>_gXX_cYY.avi")
    _check_some_on_disk(found, videos_dir)
    return DatasetIndex(dataset, str(root), classes, list(found.values()), splits)


def index_hmdb51(root: str | Path, splits_dir: str | Path) -> DatasetIndex:
    """Index an official HMDB51 tree and its split folder (see the module docstring)."""
    root, splits_dir = Path(root), Path(splits_dir)
    _require(root, "HMDB51 root (--root)")
    _require(splits_dir, "HMDB51 split folder (--splits)")
    # hidden folders (.ipynb_checkpoints, .git) are no classes
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {root}: expected <class>/<video>.avi")
    videos = {}
    for label, class_name in enumerate(classes):
        for path in sorted((root / class_name).glob("*.avi")):
            _add(videos, SourceVideo(path.stem, str(path), class_name, label, path.stem))

    splits = {}
    for k in SPLIT_IDS:
        files = [splits_dir / f"{c}_test_split{k}.txt" for c in classes]
        if not any(f.exists() for f in files):
            continue
        members = {"train": [], "test": []}
        for class_name, path in zip(classes, files):
            for where, file, use in _split_lines(_require(path, f"HMDB51 split {k} file")):
                if use not in ("0", "1", "2"):
                    raise DatasetError(f"{where}: expected lines '<video>.avi 0|1|2', got {file!r} "
                                       f"{'and no number' if use is None else use}")
                stem = Path(file).stem
                # listed but absent: packing records it as failed; listed by another class: an error
                _add(videos, SourceVideo(stem, str(root / class_name / file), class_name,
                                         classes.index(class_name), stem))
                if use != "0":
                    members["train" if use == "1" else "test"].append(stem)
        splits[k] = {s: sorted(n) for s, n in members.items()}
    if not splits:
        raise DatasetError(f"no split files in {splits_dir}: expected <class>_test_split1.txt for each class")
    if not videos:
        raise DatasetError(f"no videos in {root}: expected <class>/<video>.avi")
    _check_some_on_disk(videos, root)
    return DatasetIndex("hmdb51", str(root), classes, list(videos.values()), splits)
