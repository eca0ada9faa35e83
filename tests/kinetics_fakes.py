"""A tiny Kinetics-400 copy in the official layout, made with the synthetic generator's videos.

Classes are motion profiles named like Kinetics labels (lower case, spaces); each clip is an .mp4
named `<youtube_id>_<start:06d>_<end:06d>.mp4`, flat or in class folders; the CSVs carry the real
columns (label,youtube_id,time_start,time_end,split,is_cc). One listed clip is never downloaded
(missing) and one is a broken download (its bytes cut short), as in a real copy.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from preprocess.synthetic import PROFILES, SyntheticConfig, render_clip, sample_appearance, sample_motion, write_avi

LABELS = {"ConstantSpeed": "riding a bike", "MoveThenReverse": "abseiling", "Accelerate": "air drumming"}
MISSING = "missing0000_000010_000020"
BROKEN = "broken00000_000003_000013"


def write_kinetics_tree(base: Path, clips_per_class: int = 3, frames: int = 8,
                        class_folders: bool = False) -> tuple[Path, Path]:
    """-> (video root, annotation folder). Per class: `clips_per_class` train clips, one validate
    clip and one labelled test clip; plus MISSING (train, not on disk), BROKEN (validate, cut
    short) and two unlabelled test rows."""
    config = SyntheticConfig(classes=len(LABELS), videos_per_class=4, clips_per_group=1, frames=frames, height=32, width=40)
    root, annotations = base / "kinetics400", base / "annotations"
    annotations.mkdir(parents=True)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "validate": [], "test": []}
    for label_id, (profile, label) in enumerate(LABELS.items()):
        subsets = ["train"] * clips_per_class + ["validate", "test"]
        for clip, subset in enumerate(subsets):
            youtube_id = f"{label[:3]}{label_id}{clip:02d}".replace(" ", "_").ljust(11, "x")
            start = 10 * clip
            rows[subset].append({"label": label, "youtube_id": youtube_id, "time_start": str(start),
                                 "time_end": str(start + 10), "split": subset, "is_cc": "0"})
            rng = np.random.default_rng([label_id, clip])
            look = sample_appearance(rng, config.height, config.width)
            folder = root / subset / label if class_folders else root / subset
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{youtube_id}_{start:06d}_{start + 10:06d}.mp4"
            write_avi(path, render_clip(look, sample_motion(PROFILES[profile], config, look, rng)), config.fps, "mp4v")
    rows["train"].append({"label": "abseiling", "youtube_id": MISSING[:11], "time_start": "10", "time_end": "20",
                          "split": "train", "is_cc": "0"})
    rows["validate"].append({"label": "air drumming", "youtube_id": BROKEN[:11], "time_start": "3",
                             "time_end": "13", "split": "validate", "is_cc": "0"})
    good = next((root / "validate").rglob("*.mp4")).read_bytes()
    (root / "validate" / f"{BROKEN}.mp4").write_bytes(good[: len(good) // 8])
    for k in range(2):  # test.csv as first released: no label
        rows["test"].append({"label": "", "youtube_id": f"unlabel{k:04d}", "time_start": "0", "time_end": "10",
                             "split": "test", "is_cc": "0"})
    for subset, listed in rows.items():
        with open(annotations / f"{subset}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
            writer.writeheader()
            writer.writerows(listed)
    return root, annotations
