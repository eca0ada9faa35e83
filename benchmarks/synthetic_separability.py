"""How much of the synthetic dataset's class is visible to motion features without learning.

Issue 2 asks that classes are not separable from time-averaged flow alone (plain translation
classes were: 94-100% R@1) while temporal structure carries them. This generates a synthetic
dataset, computes flow (Farneback, a fast stand-in for TV-L1 here), and reports nearest-neighbour
R@1 (split-1 test queries against the train gallery, cosine) for:
  avg_field      the time-averaged flow field [H, W, 2]       (should be near chance)
  avg_stats      global means: |flow|, |mean flow|, moving fraction, |components|
  speed_profile  mean speed of moving pixels per frame [T-1]  (temporal structure: well above chance)
  quarter_fields the flow field averaged over each quarter of the clip

    python benchmarks/synthetic_separability.py [--classes 5] [--videos-per-class 40] [--clips-per-group 4]

Prints R@1 per feature and one JSON line naming the device (the CPU: numpy and OpenCV) and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import ArgumentParser, header, positive_int, run_script, user_input  # noqa: E402
from preprocess.datasets import index_ucf101  # noqa: E402
from preprocess.synthetic import SyntheticConfig, generate_raw  # noqa: E402
from preprocess.video import read_video  # noqa: E402


def features(path: str) -> dict[str, np.ndarray]:
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in read_video(path).frames]
    flow = np.stack([cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0) for a, b in zip(gray, gray[1:])])
    mag = np.linalg.norm(flow, axis=-1)  # [T-1, H, W]
    moving = mag > 0.5
    return {
        "avg_field": flow.mean(0).ravel(),
        "avg_stats": np.array([mag.mean(), np.linalg.norm(flow.mean(0), axis=-1).mean(), moving.mean(), np.abs(flow).mean()]),
        "speed_profile": np.array([m[k].mean() if k.any() else 0.0 for m, k in zip(mag, moving)]),
        "quarter_fields": np.concatenate([q.mean(0).ravel() for q in np.array_split(flow, 4)]),
    }


def recall_at_1(gallery: np.ndarray, queries: np.ndarray, g_labels, q_labels, standardise: bool) -> float:
    if standardise:  # a few features of different units: z-score, then Euclidean
        mu, sd = gallery.mean(0), gallery.std(0) + 1e-6
        nearest = ((((queries - mu) / sd)[:, None] - ((gallery - mu) / sd)[None]) ** 2).sum(-1).argmin(1)
    else:
        unit = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)
        nearest = (unit(queries) @ unit(gallery).T).argmax(1)
    return float(np.mean(np.asarray(g_labels)[nearest] == np.asarray(q_labels)))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--videos-per-class", type=int, default=40)
    parser.add_argument("--clips-per-group", type=positive_int, default=4,
                        help="clips cut from one source recording (its own group, never its own neighbour)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    with user_input(ValueError):  # the config's checks name the flag to change
        config = SyntheticConfig(classes=args.classes, videos_per_class=args.videos_per_class,
                                 clips_per_group=args.clips_per_group, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        index = index_ucf101(generate_raw(config, tmp))
        feats = {v.name: features(v.path) for v in index.videos}
    label = {v.name: v.label for v in index.videos}
    train, test = index.splits["1"]["train"], index.splits["1"]["test"]
    results = {"chance": 1 / args.classes}
    for kind in feats[train[0]]:
        gallery, queries = (np.stack([feats[n][kind] for n in names]) for names in (train, test))
        results[kind] = recall_at_1(gallery, queries, [label[n] for n in train], [label[n] for n in test], kind == "avg_stats")
    for kind, value in results.items():
        print(f"{kind:>15}  R@1 {value:.2f}")
    print(json.dumps({**header("synthetic_separability", "cpu"), "config": vars(args), "train": len(train),
                      "test": len(test), "r_at_1": results}))


if __name__ == "__main__":
    sys.exit(run_script("synthetic_separability.py", main))
