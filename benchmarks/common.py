"""Helpers shared by the benchmark scripts: the device's name and the versions their JSON line
records (cvtcl.provenance's, as training records them), the toy shards they time loaders on, and
their error boundary (`run_script`: input the user can fix is one line and exit 2, as for the
console commands), with the parser and argument types that check flags before any work.

Imported as `benchmarks.common`: every script has the repository root on sys.path (PYTHONPATH, or
its own sys.path insert), whether it runs as `python benchmarks/x.py` or a test imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cvtcl.errors import EXIT_USAGE, UsageError, one_line
from cvtcl.provenance import cpu_name, versions


def device_name(device) -> str:
    """The device a benchmark's JSON line names: the GPU's name, or 'CPU <model> (N cores)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name() or platform.machine()} ({os.cpu_count()} cores)"


def header(benchmark: str, device) -> dict:
    """The start of a benchmark's JSON line: what ran, on which device, with which versions (those
    that decide the arithmetic; DALI's and OpenCV's when the script imported them)."""
    return {"benchmark": benchmark, "device": device_name(device), "versions": versions()}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a flag's type or choices refusing a value, an unknown flag)
    are a UsageError: one line and exit 2 through `run_script`, as the scripts' own checks are,
    instead of the usage and then the line."""

    def error(self, message: str):
        raise UsageError(message)


def _at_least(least: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"a whole number >= {least}, got {text!r}")
        return value

    return whole_number


# argparse types: a count or size that 0 or less would turn into a division by zero or an error
# row after minutes of work (steps, batch, pixels), and one that may be 0 (warm-up steps).
positive_int = _at_least(1)
non_negative_int = _at_least(0)


def _real(accept: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """argparse type: a number `accept` takes (a NaN never), else the error says `what` it must be."""
    def real(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isnan(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return real


fraction = _real(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1")  # "0.65"
positive_float = _real(lambda v: 0.0 < v < math.inf, "a number above 0")  # a rate: "350.5"


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma list of whole numbers >= 1 ("2,3")."""
    return [positive_int(item) for item in text.split(",") if item]


def json_path(text: str) -> Path:
    """argparse type: a file a script writes its JSON to, at the end of minutes of timing: its
    folder must exist now, not when the results are ready."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it, e.g. {path / 'out.json'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist; create it or write elsewhere")
    return path


def write_toy_shards(root: str | Path, *, size: str, num_videos: int, frames: int, with_flow: bool = False) -> Path:
    """Toy shards (dali_pipelines.toy_shards) for a loader timing: `num_videos` moving videos of
    `size` ("HxW") frames, 8 more frames than a clip of `frames`, 64 videos per shard, JPEG quality 90."""
    from dali_pipelines.toy_shards import write_toy_dataset

    height, width = (int(v) for v in size.lower().split("x"))
    return write_toy_dataset(root, num_videos=num_videos, num_frames=frames + 8, height=height, width=width,
                             num_static=0, with_flow=with_flow, videos_per_shard=64, quality=90)


def run_script(prog: str, main: Callable[[], Any]) -> int:
    """A benchmark's `__main__`: a UsageError (a flag's value, a path that is not a dataset,
    --device cuda where torch sees no GPU) is one line on stderr and exit status 2, as the console
    commands do (cvtcl/errors.py); anything else keeps its traceback. Only at the script's
    boundary: main() called in-process (tests, gpu_loader_check's decoder sweep) still raises, so
    the checks that record a failure in their JSON and exit 0 go on doing so."""
    try:
        status = main()
    except UsageError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return status if isinstance(status, int) else 0


@contextlib.contextmanager
def user_input(*errors: type[BaseException]) -> Iterator[None]:
    """Errors of these types raised inside come from what the user gave (a flag's value, a path):
    raised again as a UsageError with the same message, which already says what to do."""
    try:
        yield
    except errors as err:
        raise UsageError(one_line(err)) from None


def check_device(device: str, flag: str = "--device", auto: bool = False) -> None:
    """`device` (cpu, cuda, cuda:N; `auto` where the script takes it) exists on this machine. Checked
    before any work: without a GPU, --device cuda otherwise fails minutes later, deep in a loader
    or the trainer, with torch's 'Found no NVIDIA driver' traceback."""
    import torch

    if auto and device == "auto":
        return
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device}: not a device; use {'auto, ' if auto else ''}cpu or cuda (cuda:N for one GPU)")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: torch {torch.__version__} sees no CUDA device on this machine; use {flag} cpu"
                         + (" (or auto)" if auto else ""))
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")


def peak_memory_bandwidth(device=None) -> float | None:
    """The GPU's peak memory bandwidth in bytes/s, from its properties (two transfers per memory
    clock over the whole bus: 3.35e12 on an H100 SXM), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 or None


def profile_kernels(run: Callable[[], Any], repeats: int, synchronize: Callable[[], Any], per: str = "step") -> dict:
    """`run()` (a `per`: a step, a batch) `repeats` times under torch.profiler: the top-20 CUDA
    kernels by total time, the fraction of the wall time the GPU was busy, and kernels per `per`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    return summarize_kernels([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                             wall_us, repeats, per)


def summarize_kernels(kernels: list, wall_us: float, repeats: int, per: str = "step") -> dict:
    """Profiler kernel events (`name`, `device_time` in us) -> kernels per repeat, the GPU busy
    fraction of `wall_us` (kernels of one stream do not overlap) and the top 20 by total time."""
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.device_time)
    busy_us = sum(sum(times) for times in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    return {f"kernels_per_{per}": len(kernels) / repeats, "gpu_busy_fraction": busy_us / wall_us,
            "top_kernels": [{"name": n[:120], "total_ms": sum(t) / 1000, "calls": len(t)} for n, t in top]}


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both positive; anything else a UsageError naming the flag."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise UsageError(f"{flag}: sizes are HxW in pixels, e.g. 240x320; got {text!r}")
    return height, width
