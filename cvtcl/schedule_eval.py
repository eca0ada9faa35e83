"""Evaluate a whole CVTCL schedule side by side: random init, stage 1, each co-training cycle.

Answers the questions of paper Tables 2-3 and Fig. 3 on one dataset in one table: does stage 1
(InfoNCE + LTCL, §2.1/§2.3) learn anything over a random network, and does cross-view
co-training (§2.2/§2.4) add to it? For each setting it extracts centre-crop features of the train
and test split once and reports retrieval R@k and linear-probe top-1 per stream (rgb, flow,
two-stream).

Random init is reported twice (issue 6): batch norm with running statistics (`bn_mode="eval"`,
for an untrained net mean 0 / var 1: no normalisation) and with batch statistics
(`bn_mode="batch"`); a claim that training helps is measured against the better of the two.

The schedule directory is the one `python -m cvtcl.train --preset ...-cvtcl` writes:
`<root>/stage1-rgb/`, `<root>/stage1-flow/`, `<root>/cycle<c>-<modality>/`, each with its
checkpoints and metrics.jsonl (`cvtcl.schedule`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvtcl.eval import LoaderFactory, run_linear, run_retrieval, split_features
from cvtcl.linear_probe import LinearProbeConfig
from cvtcl.metrics import read_metrics
from cvtcl.report import STREAM_ORDER

_STAGE_DIR = re.compile(r"^(stage1|cycle(\d+))-(rgb|flow)$")


@dataclass
class Setting:
    """One group of table rows: encoders per modality and how their batch norm runs."""

    name: str
    encoders: dict[str, nn.Module]
    bn_mode: str = "eval"


def random_init_settings(make_encoder: Callable[[str], nn.Module], seed: int = 0,
                         modalities: Sequence[str] = ("rgb", "flow")) -> list[Setting]:
    """The untrained baseline in both batch-norm modes (the same weights for both)."""
    encoders = {}
    for index, modality in enumerate(modalities):
        torch.manual_seed(seed + index)
        encoders[modality] = make_encoder(modality)
    return [Setting("random-init (BN eval)", encoders, "eval"), Setting("random-init (BN batch)", encoders, "batch")]


def schedule_settings(root: str | Path, load: Callable[[Path], nn.Module] | None = None) -> list[Setting]:
    """"stage 1" and "cycle <c>" settings from the final checkpoint of each sub-stage directory.

    load(run_dir) -> encoder; by default the newest checkpoint-*.pt's query encoder
    (`cvtcl.checkpoint`). Sub-stages that have no checkpoint yet are left out.
    """
    load = load or _latest_query_encoder
    groups: dict[int, dict[str, nn.Module]] = {}
    for run_dir in sorted(Path(root).iterdir()):
        match = _STAGE_DIR.match(run_dir.name)
        if not match or not run_dir.is_dir():
            continue
        cycle = int(match.group(2) or 0)
        encoder = load(run_dir)
        if encoder is not None:
            groups.setdefault(cycle, {})[match.group(3)] = encoder
    return [Setting("stage 1" if cycle == 0 else f"cycle {cycle}", groups[cycle]) for cycle in sorted(groups)]


def _latest_query_encoder(run_dir: Path) -> nn.Module | None:
    from cvtcl.checkpoint import latest_checkpoint, load_encoder

    path = latest_checkpoint(run_dir)
    return None if path is None else load_encoder(path, which="query", map_location="cpu")[0]


def evaluate_settings(
    settings: Sequence[Setting],
    make_loader: LoaderFactory,
    num_classes: int,
    *,
    device: str = "cpu",
    probe: LinearProbeConfig | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """{setting: {stream: {"R@k": %, "linear top-1": %}}}, and the last setting's retrieval lists
    (features and top-3 indices, for the retrieval figure)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    last: dict[str, Any] = {}
    for setting in settings:
        train, test = split_features(setting.encoders, make_loader, device=device, bn_mode=setting.bn_mode)
        recalls, tops = run_retrieval(train, test, ks)
        linear = run_linear(train, test, num_classes, probe)
        results[setting.name] = {stream: {**recalls[stream], "linear top-1": linear[stream]["top1"]}
                                 for stream in recalls}
        last = {"train": train, "test": test, "tops": tops, "setting": setting.name}
    return results, last


def table_rows(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Flatten to {"<setting> / <stream>": metrics} for `report.results_table`, in setting order."""
    return {f"{setting} / {stream}": streams[stream] for setting, streams in results.items()
            for stream in sorted(streams, key=STREAM_ORDER.index)}


def loss_drop(metrics_path: str | Path, key: str = "loss", window: int = 3) -> dict[str, float]:
    """Mean `key` over the first and the last `window` logged steps, and the relative fall (0.4 = 40%)."""
    values = [r[key] for r in read_metrics(metrics_path) if isinstance(r.get(key), (int, float))]
    if len(values) < 2:
        raise ValueError(f"{metrics_path}: fewer than two {key!r} values; did the run log anything?")
    window = max(1, min(window, len(values) // 2))
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    return {"first": first, "last": last, "fall": (first - last) / first if first else 0.0}


def learning_checks(results: dict[str, dict[str, dict[str, float]]], root: str | Path,
                    margin: float = 5.0, min_fall: float = 0.4) -> list[dict[str, Any]]:
    """The demo's claims as rows {"check", "value", "target", "passed"} (issue 6 "Must show").

    - flow R@1 of the last trained setting beats the better random-init BN mode by `margin` points;
    - every stage-1 run's loss falls by `min_fall` (first vs last logged steps);
    - RGB R@1 after stage 1 and after the last co-training cycle (reported; the paper's Table 3
      effect is that cross-view mining lifts it).
    """
    random = [results[s] for s in results if s.startswith("random-init")]
    trained = [s for s in results if not s.startswith("random-init")]
    checks: list[dict[str, Any]] = []
    if random and trained:
        best_random = max(r["flow"]["R@1"] for r in random if "flow" in r)
        final = results[trained[-1]]
        if "flow" in final:
            gain = final["flow"]["R@1"] - best_random
            checks.append({"check": f"flow R@1, {trained[-1]} minus best random-init", "value": gain,
                           "target": f">= {margin}", "passed": gain >= margin})
    for metrics in sorted(Path(root).glob("stage1-*/metrics.jsonl")):
        fall = loss_drop(metrics)["fall"]
        checks.append({"check": f"{metrics.parent.name} loss fall", "value": 100 * fall,
                       "target": f">= {100 * min_fall:.0f}%", "passed": fall >= min_fall})
    rgb = [(s, results[s]["rgb"]["R@1"]) for s in trained if "rgb" in results[s]]
    if len(rgb) >= 2:
        (first, before), (last, after) = rgb[0], rgb[-1]
        checks.append({"check": f"rgb R@1 change, {first} -> {last}", "value": after - before,
                       "target": f"none, reported: {before:.1f} -> {after:.1f}", "passed": None})
    return checks
