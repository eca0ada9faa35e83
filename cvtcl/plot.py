"""`cvtcl-plot RUN_DIR` (or `python -m cvtcl.plot RUN_DIR`): figures from a run directory as PNG.

- Training curves (the paper's Fig. 3) from every `metrics.jsonl` below RUN_DIR: each loss term,
  the contrastive top-1, the learning rate, and the kNN retrieval R@k of the training monitor when
  the run logged it. One figure per metrics file (a whole CVTCL schedule has one per sub-stage).
- Retrieval examples (the paper's Fig. 4) from every `retrieval-neighbours-*.json` that
  `python -m cvtcl.eval retrieval` wrote there: query videos with their top-3 train neighbours per
  stream, middle RGB frames read from the shards, a green frame for the query's class, red otherwise.

Figures go to RUN_DIR/figures/ (written under a temporary name, then renamed). matplotlib is the
`plot` extra (`pip install -e '.[plot]'`) and runs with the Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvtcl.errors import UsageError, run_command
from cvtcl.metrics import read_metrics  # noqa: F401 (part of this module's interface)
from cvtcl.report import NEIGHBOURS_PREFIX
from preprocess.hygiene import remove_temporaries, writer_temporary

STEP_KEYS = ("step", "global_step", "iteration", "epoch")  # first present one is the x axis
PANELS = (  # (title, does this metric key belong here)
    ("losses", lambda k: "loss" in k.lower()),
    ("contrastive top-1", lambda k: ("top1" in k.lower() or "acc" in k.lower()) and not _is_knn(k)),
    ("learning rate", lambda k: k.lower() == "lr" or k.lower().startswith("lr/") or k.lower().endswith("/lr")),
    ("kNN retrieval (%)", lambda k: _is_knn(k)),
    ("mined positives: class precision", lambda k: k.lower().startswith("mining")),  # stage 2 only
)


def _natural(key: str) -> list:
    """Sort key that puts R@5 before R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _is_knn(key: str) -> bool:
    return key.lower().startswith("knn") or "R@" in key


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("cvtcl-plot needs matplotlib, the plot extra: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent)  # those of plots killed while they wrote
    tmp = writer_temporary(path)  # a plot in a watch loop and one by hand wrote into one temporary
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def curve_series(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """(x-axis name, {metric key: (xs, ys)}) for every numeric, finite metric of the records."""
    x_key = next((k for k in STEP_KEYS if any(k in r for r in records)), None)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        x = record.get(x_key, index) if x_key else index
        for key, value in record.items():
            if key in STEP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    return x_key or "record", series


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """One PNG with a panel per PANELS group that has data (kNN only when the monitor ran)."""
    plt = _pyplot()
    x_name, series = curve_series(read_metrics(metrics_path))
    panels = [(name, sorted((k for k in series if belongs(k)), key=_natural)) for name, belongs in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        raise ValueError(f"{metrics_path}: no loss, top-1, lr, kNN or mining metric to plot (keys: {sorted(series)})")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
        if name == "learning rate" and min(min(series[k][1]) for k in keys) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title or str(metrics_path), fontsize=9, y=1.03)  # above the panel titles
    path = _save(fig, Path(out_path))
    plt.close(fig)
    return path


def middle_frames(shards: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """{name: middle RGB frame [H, W, 3] uint8} read from the packed dataset."""
    import cv2

    from preprocess.shards import ShardReader

    reader = ShardReader(shards)
    by_name = {v.name: v for v in reader.videos}
    frames = {}
    for name in dict.fromkeys(names):
        if name not in by_name:
            raise KeyError(f"{shards}: no video {name!r}; pass --shards for the dataset the evaluation used")
        video = by_name[name]
        (jpeg,) = reader.read_rgb(video, video.num_frames // 2, 1)
        frames[name] = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    reader.close()
    return frames


def pick_queries(labels: Sequence[int], count: int) -> list[int]:
    """`count` query rows from evenly spaced classes, the first query of each: deterministic."""
    classes = sorted(set(labels))
    count = min(count, len(classes))
    chosen = [classes[round(i * (len(classes) - 1) / max(count - 1, 1))] for i in range(count)]
    return [labels.index(c) for c in chosen]


def plot_retrieval(neighbours_file: str | os.PathLike, out_path: str | os.PathLike,
                   shards: str | os.PathLike | None = None, num_queries: int = 6, title: str | None = None) -> Path:
    """Rows = queries; columns = the query, then its top-3 neighbours for each stream. `title`: what
    names the file in the figure (default: its name)."""
    plt = _pyplot()
    try:
        data = json.loads(Path(neighbours_file).read_text())
        queries, gallery, classes = data["queries"], data["gallery"], data["classes"]
        streams = [s for s in ("rgb", "flow", "two-stream") if s in data["neighbours"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{neighbours_file}: not a retrieval-neighbours file of cvtcl.eval ({type(err).__name__}: "
                         f"{err}); rerun the retrieval evaluation or move the file away") from None
    queries, gallery, classes = data["queries"], data["gallery"], data["classes"]
    streams = [s for s in ("rgb", "flow", "two-stream") if s in data["neighbours"]]
    rows = pick_queries([q["label"] for q in queries], num_queries)
    k = len(data["neighbours"][streams[0]][0])
    names = [queries[r]["name"] for r in rows]
    names += [gallery[g]["name"] for s in streams for r in rows for g in data["neighbours"][s][r]]
    frames = middle_frames(shards or data["shards"], names)
    columns = 1 + k * len(streams)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 1.75 * len(rows)), squeeze=False)
    for row, query_row in enumerate(rows):
        query = queries[query_row]
        cells = [(query, "query", "black")]
        for stream in streams:
            for rank, g in enumerate(data["neighbours"][stream][query_row]):
                hit = gallery[g]["label"] == query["label"]
                cells.append((gallery[g], f"{stream} #{rank + 1}", "green" if hit else "red"))
        for col, (video, heading, colour) in enumerate(cells):
            ax = axes[row][col]
            ax.imshow(frames[video["name"]])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if col else 1)
            ax.set_title(f"{heading}\n{classes[video['label']][:16]}", fontsize=7, color=colour)
    fig.suptitle(f"{title or Path(neighbours_file).name}: test queries and their top-{k} train neighbours", fontsize=9)
    path = _save(fig, Path(out_path))
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             shards: str | os.PathLike | None = None, num_queries: int = 6) -> list[Path]:
    """Every figure RUN_DIR has data for; returns the PNG paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory; give a training run directory (metrics.jsonl below it) "
                         "or an evaluation's --out")
    out_dir = Path(out_dir) if out_dir else run_dir / "figures"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a directory for the PNGs")
    written = []
    for metrics in sorted(run_dir.rglob("metrics.jsonl")):
        stem = "-".join(metrics.parent.relative_to(run_dir).parts) or "run"
        written.append(plot_curves(metrics, out_dir / f"curves-{stem}.png", title=str(metrics.relative_to(run_dir))))
    for neighbours in sorted(run_dir.rglob(f"{NEIGHBOURS_PREFIX}*.json")):
        # the sub-directory in the name, as for the curves: each sub-stage's evaluation its own figure
        where = "-".join(["retrieval", *neighbours.parent.relative_to(run_dir).parts])
        stem = neighbours.stem.replace(NEIGHBOURS_PREFIX, f"{where}-")
        written.append(plot_retrieval(neighbours, out_dir / f"{stem}.png", shards, num_queries,
                                      title=str(neighbours.relative_to(run_dir))))
    if not written:
        raise UsageError(f"{run_dir}: no metrics.jsonl and no {NEIGHBOURS_PREFIX}*.json below it; nothing to plot "
                         "(give the run.out_dir of a training run, or the --out of an evaluation)")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: expected errors as one line (cvtcl/errors.py), exit 2; 130 after Ctrl-C."""
    return run_command("cvtcl-plot", _main, argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cvtcl-plot", description="Training curves and retrieval figures as PNG.")
    parser.add_argument("run_dir", help="a training run directory (metrics.jsonl below it) or evaluation output")
    parser.add_argument("--out", help="where the PNGs go (default RUN_DIR/figures)")
    parser.add_argument("--shards", help="dataset directory for retrieval frames (default: the one evaluated)")
    parser.add_argument("--queries", type=int, default=6, help="query rows in the retrieval figure")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    if args.queries < 1:
        raise UsageError(f"--queries={args.queries}: must be at least 1")
    written = plot_run(args.run_dir, args.out, args.shards, args.queries)
    for path in written:
        print(path)
    return 0  # the console script's exit status


if __name__ == "__main__":
    sys.exit(main())
