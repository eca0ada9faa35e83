"""Preprocessing speed per worker: frames/s of RGB packing and of flow, on generated videos.

RGB packing = decode the .avi + JPEG-encode every frame (`pack.encode_video` without flow).
Flow = the backend's `compute` on grayscale frames + `encode_flow` (quantise, two JPEG planes).
One process, OpenCV limited to one thread, as each packing worker runs; a run with --workers N
scales about N-fold while cores last. Prints a rich table and one JSON line.

    python benchmarks/preprocess_speed.py [--sizes 64x80,240x320] [--frames 16] [--flow tvl1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402
    ArgumentParser,
    check_device,
    cpu_name,
    parse_size,
    positive_int,
    run_script,
    user_input,
)
from cvtcl.errors import UsageError  # noqa: E402
from preprocess.datasets import SourceVideo  # noqa: E402
from preprocess.flow import encode_flow, make_backend  # noqa: E402
from preprocess.pack import ConfigError, PackOptions, encode_video  # noqa: E402
from preprocess.synthetic import (  # noqa: E402
    MIN_SIDE,
    PROFILES,
    SyntheticConfig,
    render_clip,
    sample_appearance,
    sample_motion,
    write_avi,
)


def make_video(path: Path, frames: int, height: int, width: int, seed: int) -> SourceVideo:
    config = SyntheticConfig(frames=frames, height=height, width=width)
    rng = np.random.default_rng(seed)
    look = sample_appearance(rng, height, width)
    write_avi(path, render_clip(look, sample_motion(PROFILES["StopAndGo"], config, look, rng)), 25.0)
    return SourceVideo(path.stem, str(path), "StopAndGo", 0, "g")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call. CPU time of this one-threaded process is what a worker
    costs on an idle core; wall time includes whatever else the machine runs."""
    fn()  # warm-up: first call pays for allocations and OpenCV's lazy init
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def measure(video: SourceVideo, frames: int, args) -> dict:
    options = PackOptions(out="-", jpeg_quality=args.jpeg_quality, flow=args.flow, flow_options=args.flow_options)
    rgb_wall, rgb_cpu = timed(lambda: encode_video(video, options, None), args.repeats)
    backend = make_backend(args.flow, **args.flow_options)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in _frames(video.path)])
    flow_wall, flow_cpu = timed(lambda: encode_flow(backend.compute(gray), options.flow_jpeg_quality), args.repeats)
    return {"rgb_frames_per_s": frames / rgb_wall, "rgb_frames_per_cpu_s": frames / rgb_cpu,
            "flow_frames_per_s": (frames - 1) / flow_wall, "flow_frames_per_cpu_s": (frames - 1) / flow_cpu,
            "flow_backend": backend.name}


def _frames(path: str) -> list[np.ndarray]:
    from preprocess.video import iter_frames

    return list(iter_frames(path))


def machine() -> dict:
    return {"host": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average_1min": os.getloadavg()[0]}  # a shared machine slows the wall-clock rates


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x80,240x320", help="HxW list (64x80: synthetic; 240x320: UCF101)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed calls per measurement")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--flow", default="tvl1")
    parser.add_argument("--flow-device", default=None)
    parser.add_argument("--flow-batch", type=positive_int, default=None)
    args = parser.parse_args(argv)
    args.flow_options = {k: v for k, v in (("device", args.flow_device), ("batch", args.flow_batch)) if v is not None}
    sizes = [parse_size(size, "--sizes") for size in args.sizes.split(",")]
    if min(min(size) for size in sizes) < MIN_SIDE:  # the generator's floor, said in this script's words
        raise UsageError(f"--sizes {args.sizes}: frames are at least {MIN_SIDE} pixels a side")
    if args.flow_device is not None:
        check_device(args.flow_device, "--flow-device")
    try:
        with user_input(ValueError):  # an unknown --flow, a value the backend refuses
            make_backend(args.flow, **args.flow_options)
    except TypeError as err:  # an option this backend does not take (OpenCV's has no device)
        flags = [f"--flow-{k}" for k in args.flow_options if f"'{k}'" in str(err)] or ["--flow-device/--flow-batch"]
        raise UsageError(f"--flow {args.flow} takes no {' or '.join(flags)}; leave it out for this backend") from None
    with user_input(ValueError, ConfigError):  # the generator's and the packer's checks: --frames, --jpeg-quality
        PackOptions(out="-", jpeg_quality=args.jpeg_quality, flow=args.flow, flow_options=args.flow_options)
        for height, width in sizes:
            SyntheticConfig(frames=args.frames, height=height, width=width)
    cv2.setNumThreads(1)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (height, width) in enumerate(sizes):
            video = make_video(Path(tmp) / f"v_{height}x{width}.avi", args.frames, height, width, seed=i)
            results.append({"height": height, "width": width, **measure(video, args.frames, args)})

    from rich.console import Console
    from rich.table import Table

    host = machine()
    table = Table(title=f"preprocessing, one worker ({host['cpu']})")
    flow = results[0]["flow_backend"]
    for column in ("frame size", "RGB packing frames/s", "(per CPU s)", f"flow ({flow}) frames/s", "(per CPU s)"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r['height']}x{r['width']}", f"{r['rgb_frames_per_s']:.0f}", f"{r['rgb_frames_per_cpu_s']:.0f}",
                      f"{r['flow_frames_per_s']:.1f}", f"{r['flow_frames_per_cpu_s']:.1f}")
    Console(stderr=True).print(table)
    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "opencv": cv2.__version__, "h5py": h5py.__version__}
    print(json.dumps({"benchmark": "preprocess_speed", "machine": host, "versions": versions,
                      "frames": args.frames, "results": results}))


if __name__ == "__main__":
    sys.exit(run_script("preprocess_speed.py", main))
