"""Evaluation results as a rich table on the terminal and as JSON files next to the run.

Two files per evaluation (both written to a temporary name, then renamed):
- `eval-<protocol>-<dataset>-split<N>.json`: the numbers, the protocol and the inputs;
- `retrieval-neighbours-<dataset>-split<N>.json` (retrieval only): for each query its top-3
  gallery videos per stream, which `cvtcl-plot` turns into the paper's Fig. 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from cvtcl.features import VideoFeatures
from preprocess.schema import write_json_atomic

STREAM_ORDER = ("rgb", "flow", "two-stream")
NEIGHBOURS_PREFIX = "retrieval-neighbours-"


def results_path(out_dir: str | os.PathLike, protocol: str, dataset: str, split: str) -> Path:
    return Path(out_dir) / f"eval-{protocol}-{dataset}-split{split}.json"


def neighbours_path(out_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    return Path(out_dir) / f"{NEIGHBOURS_PREFIX}{dataset}-split{split}.json"


def _ordered(rows: Mapping[str, Any]) -> list[str]:
    return sorted(rows, key=lambda name: (STREAM_ORDER.index(name) if name in STREAM_ORDER else 99, name))


def results_table(title: str, rows: Mapping[str, Mapping[str, float]], columns: list[str] | None = None,
                  label: str = "stream") -> Table:
    """A table with one row per stream (or per labelled setting) and one column per metric."""
    columns = columns or list(dict.fromkeys(key for row in rows.values() for key in row))
    table = Table(title=title)
    table.add_column(label)
    for column in columns:
        table.add_column(column, justify="right")
    for name in _ordered(rows) if label == "stream" else rows:
        row = rows[name]
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append("-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value))
        table.add_row(name, *cells)
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table)


def write_results(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)
    return path


def neighbours_payload(
    shards: str | os.PathLike,
    classes: list[str],
    query: VideoFeatures,
    gallery: VideoFeatures,
    tops: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """JSON-ready retrieval lists: queries (name, label) and per stream their top-k gallery videos."""
    return {
        "shards": str(Path(shards).resolve()),
        "classes": classes,
        "queries": [{"name": n, "label": int(l)} for n, l in zip(query.names, query.labels.tolist())],
        "gallery": [{"name": n, "label": int(l)} for n, l in zip(gallery.names, gallery.labels.tolist())],
        "neighbours": {stream: top.tolist() for stream, top in tops.items()},  # [Q][k] gallery rows
    }
