"""Progress of a packing run: a rich bar (videos, frames/s, ETA) on a terminal, plain log lines
otherwise (CI logs, `nohup`), so a long UCF101 run can be watched either way."""

from __future__ import annotations

import sys
import time

from preprocess.schema import FailedVideo, shard_name


class Progress:
    """Plain lines on stderr: one per finished shard and per failed video. `videos` counts the
    processed ones, packed or failed (what the ETA needs); the lines say how many of them failed,
    so that '31/31' is not read as 31 packed when the summary then says 30."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.videos = self.frames = self.total = self.failures = 0
        self.t0 = time.monotonic()

    @staticmethod
    def auto() -> "Progress":
        return RichProgress() if sys.stderr.isatty() else Progress()

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def start(self, total_videos: int, kept_shards: int, total_shards: int) -> None:
        self.total, self.total_shards = total_videos, total_shards
        self.t0 = time.monotonic()
        if kept_shards:
            self.log(f"resuming: kept {kept_shards} complete shard(s) of {total_shards}")
        self.log(f"packing {total_videos} video(s) into {total_shards - kept_shards} shard(s)")

    def _rates(self) -> tuple[float, str]:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        left = self.total - self.videos
        eta = elapsed / self.videos * left if self.videos else float("nan")
        return self.frames / elapsed, f"{eta:.0f}s" if eta == eta else "?"

    def video_done(self, frames: int) -> None:
        self.videos += 1
        self.frames += frames

    def failed(self, failure: FailedVideo) -> None:
        self.videos += 1
        self.failures += 1
        self.log(f"FAILED {failure.name}: {failure.reason}")

    def shard_done(self, index: int) -> None:
        fps, eta = self._rates()
        # named, not "k of n": a part (--part) writes every N-th shard
        self.log(f"{shard_name(index)} written: {self.videos}/{self.total} videos processed "
                 f"({self.videos - self.failures} packed, {self.failures} failed), {fps:.0f} frames/s, ETA {eta}")

    def stop(self) -> None:
        pass


class RichProgress(Progress):
    """A live rich bar; failures and shards are still printed above it."""

    def __init__(self):
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("videos processed,"),
                       TextColumn("{task.fields[failed]} failed,"), TextColumn("{task.fields[fps]:.0f} frames/s"),
                       TimeRemainingColumn(), transient=False)
        self.task = None

    def log(self, message: str) -> None:
        self.bar.console.print(message, highlight=False, markup=False)

    def start(self, total_videos, kept_shards, total_shards):
        super().start(total_videos, kept_shards, total_shards)
        self.task = self.bar.add_task("pack", total=total_videos, fps=0.0, failed=0)
        self.bar.start()

    def video_done(self, frames):
        super().video_done(frames)
        self.bar.update(self.task, completed=self.videos, fps=self._rates()[0])

    def failed(self, failure):
        super().failed(failure)
        self.bar.update(self.task, completed=self.videos, failed=self.failures)

    def shard_done(self, index):
        pass  # the bar shows it

    def stop(self):
        self.bar.stop()
