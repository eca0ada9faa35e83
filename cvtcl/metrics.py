"""Training metrics: metrics.jsonl, TensorBoard (when installed) and progress output (docs/design.md "Metrics").

Rank 0 writes one JSON line per log step with every loss term and accuracy (window means,
averaged over ranks), lr, clips/s (global), data-wait and compute seconds per step, the data-wait
fraction and peak memory. A resumed run first drops the lines past its checkpoint (a killed run
may have logged steps it never saved), so the file always describes one consistent history.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from preprocess.hygiene import OutputDirError

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl ([] when there is none yet). A torn last line (a run
    killed mid-write) is skipped, so resume and plots read what was fully written; a damaged line
    anywhere else is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON object; metrics.jsonl holds one per line") from None
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep the lines with step <= last_step (temp file + rename)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in read_metrics(path) if line.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
    os.replace(tmp, path)


class Window:
    """Sums of per-step values and timings between two log steps.

    A NaN value means "undefined at this step" (stage 2's mining precision before the queue is
    full): it is left out of that term's mean, and a term undefined at every step of the window
    is left out of the record.
    """

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps = 0
        self.data_seconds = 0.0
        self.compute_seconds = 0.0

    def add(self, values: dict[str, float], data_seconds: float, compute_seconds: float) -> None:
        for name, value in values.items():
            if value == value:  # not NaN
                self.sums[name] += value
                self.counts[name] += 1
        self.steps += 1
        self.data_seconds += data_seconds
        self.compute_seconds += compute_seconds

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def state_dict(self, reduce_sums=None) -> dict[str, Any]:
        """Plain values (a checkpoint loads with weights_only=True). `reduce_sums` (the ranks' mean)
        makes it the state of every rank: the logged means are averaged over ranks, and the mean
        over ranks of (restored + own new sums) / count is the uninterrupted run's."""
        sums = dict(self.sums) if reduce_sums is None else reduce_sums(dict(self.sums))
        return {"sums": sums, "counts": dict(self.counts), "steps": self.steps,
                "data_seconds": self.data_seconds, "compute_seconds": self.compute_seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Window:
        """A window holding `state` (a `state_dict()`); empty for None (a checkpoint without one)."""
        window = cls()
        if state:
            window.sums.update(state["sums"])
            window.counts.update(state["counts"])
            window.steps = state["steps"]
            window.data_seconds, window.compute_seconds = state["data_seconds"], state["compute_seconds"]
        return window


def _rich_bar():
    """Two lines: bar, step count, step rate, elapsed, ETA; under it the last logged metrics (on one
    line with the bar, a narrow terminal squeezed the bar, count and ETA out of view)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Bar(Progress):
        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            status = self.tasks[0].fields.get("status") if self.tasks else ""
            if status:
                yield Text("  " + status, style="dim")

    return Bar(TextColumn("[bold]train"), BarColumn(bar_width=30), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


class MetricsLogger:
    """Writes metrics on rank 0; every other rank holds a silent logger (no files, no output)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, progress: str, total_steps: int, start_step: int):
        self.enabled = enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.path = Path(run_dir) / METRICS_NAME
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: metrics.jsonl has everything
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress == "auto":
            progress = "rich" if sys.stdout.isatty() else "plain"
        self.mode = progress
        if progress == "rich":
            self.bar = _rich_bar()
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="", rate="")
            self.bar.start()
        self.started = time.time()

    def eta(self, step: int) -> str:
        """' eta H:MM:SS' at this launch's mean rate so far ('' before its first step)."""
        done = step - self.start_step
        if done <= 0:
            return ""
        left = (self.total_steps - step) * (time.time() - self.started) / done
        return f" eta {datetime.timedelta(seconds=round(max(left, 0.0)))}"

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:  # a full disk: one line (exit 2), not a traceback
            raise OutputDirError(f"cannot write {self.path} ({err.strerror}); the checkpoints written so far are "
                                 "kept: free space and rerun the same command to resume") from None
        if self.tensorboard is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"train/{name}", value, record["step"])
        names = [n for n in ("loss", "top1_instance", "lr", "clips_per_s") if n in record] or [
            n for n, v in record.items() if isinstance(v, (int, float)) and n not in ("step", "epoch")]  # kNN
        status = " ".join(f"{name}={record[name]:.4g}" for name in names)
        if self.mode == "rich":
            self.show(status)
            self.tick(record["step"])
        elif self.mode == "plain":  # a job's log: how far, and how long is left, as the bar shows it
            print(f"step {record['step']}/{self.total_steps} epoch {record['epoch']} {status}{self.eta(record['step'])}",
                  flush=True)

    def tick(self, step: int) -> None:
        """Move the bar to `step` (every step; cheap: rich redraws at its own refresh rate)."""
        if self.bar is None:
            return
        self.bar.update(self.task, completed=step)
        speed = self.bar.tasks[0].speed  # rich's estimate over its last 30 s of updates
        self.bar.update(self.task, rate=f"{speed:.2f} step/s" if speed else "")

    def show(self, text: str) -> None:
        """Replace the line under the bar (the last metrics, or what a long pause is doing)."""
        if self.bar is not None:
            self.bar.update(self.task, status=text)

    def message(self, text: str) -> None:
        """A one-off line on rank 0 (resume, checkpoint on SIGTERM), whatever the progress mode."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.mode != "none":
            print(text, flush=True)

    def warn(self, text: str) -> None:
        """A line that must be seen whatever the progress mode and on whichever rank met it: stderr
        (above the bar on rank 0 when it shows one)."""
        if self.bar is not None:
            self.bar.console.print(text, style="yellow")
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()
        try:
            self.file.close()
        except OSError:  # the line a full disk refused, flushed again: `log` has said so (OutputDirError)
            pass
