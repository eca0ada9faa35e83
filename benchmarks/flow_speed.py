"""Flow extraction throughput and accuracy: OpenCV TV-L1 vs tvl1-torch, side by side.

Runs the production backends (preprocess.flow) on generated videos with known flow
(preprocess.flow_check) at each size: OpenCV's CPU DualTVL1 with one worker and with one
worker per core (a process pool, as preprocessing parallelises over videos), then tvl1-torch
on the CPU (one thread, and all cores) and, when CUDA is present, on the GPU. Prints a table and one
JSON line naming the devices and versions.

    python benchmarks/flow_speed.py                       # 128x171 and 240x320
    python benchmarks/flow_speed.py --sizes 240x320 --gpu-pairs 512 --batch 128 --compile cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import cpu_name  # noqa: E402
from preprocess.flow import make_backend  # noqa: E402
from preprocess.flow_check import end_point_error, synthetic_video  # noqa: E402
from preprocess.schema import write_json_atomic  # noqa: E402

SEGMENT = 9  # frames per generated shot; pairs across two shots are cuts without ground truth


def make_video(pairs: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> gray [pairs + 1, H, W] u8 and truth [pairs, H, W, 2] (NaN for the pairs at cuts)."""
    frames, truth, seed = [], [], 0
    while len(frames) < pairs + 1:
        gray, flow = synthetic_video(SEGMENT, height, width, seed=seed)
        if frames:
            truth.append(np.full_like(flow[0], np.nan))
        frames.extend(gray)
        truth.extend(flow)
        seed += 1
    return np.stack(frames[:pairs + 1]), np.stack(truth[:pairs])


def truth_epe(flow: np.ndarray, truth: np.ndarray) -> float:
    keep = ~np.isnan(truth[:len(flow), 0, 0, 0])
    return end_point_error(flow[keep], truth[:len(flow)][keep])


_worker_backend = None


def _pool_init() -> None:
    global _worker_backend
    _worker_backend = make_backend("opencv-tvl1", threads=1)


def _pool_pair(pair: np.ndarray) -> np.ndarray:
    return _worker_backend.compute(pair)[0]


def time_opencv_pool(gray: np.ndarray, workers: int) -> tuple[float, np.ndarray]:
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_pool_init) as pool:
        list(pool.map(_pool_pair, [gray[:2]] * workers))  # start and warm every worker
        start = time.perf_counter()
        flow = np.stack(list(pool.map(_pool_pair, [gray[i:i + 2] for i in range(len(gray) - 1)])))
        return time.perf_counter() - start, flow


def time_backend(backend, gray: np.ndarray) -> tuple[float, np.ndarray]:
    # Warm-up (device start, allocator, compilation) with one pair and with two: converged pairs
    # leave working batches of any size, and torch.compile specialises size 1 separately.
    backend.compute(gray[:2])
    backend.compute(gray[:3])
    start = time.perf_counter()
    flow = backend.compute(gray)  # returns host numpy: the device work is finished
    return time.perf_counter() - start, flow


def time_torch_cpu(gray: np.ndarray, threads: int, batch: int, compiled: bool) -> tuple[float, np.ndarray]:
    backend = make_backend("tvl1-torch", device="cpu", batch=batch, compile=compiled, threads=threads)
    return time_backend(backend, gray)


def plan_runs(args, cuda: bool) -> list[tuple]:
    """(backend, where, pairs, run(gray) -> (seconds, flow)); OpenCV with one process first: the
    reference of every ratio and agreement column."""
    runs = [("opencv-tvl1", "cpu 1 proc", args.cpu_pairs,
             lambda g: time_backend(make_backend("opencv-tvl1", threads=1), g))]
    if "pool" not in args.skip:
        runs.append(("opencv-tvl1", f"cpu pool of {args.workers}", args.pool_pairs or 4 * args.workers,
                     lambda g: time_opencv_pool(g, args.workers)))
    if "torch-cpu" not in args.skip:
        for threads in sorted({1, args.workers}):
            runs.append(("tvl1-torch", f"cpu {threads} thread(s)", args.cpu_pairs,
                         lambda g, t=threads: time_torch_cpu(g, t, args.batch, False)))
        if args.compile == "all":
            runs.append(("tvl1-torch compiled", "cpu 1 thread(s)", args.cpu_pairs,
                         lambda g: time_torch_cpu(g, 1, args.batch, True)))
    for compiled in (False, True)[:1 + (args.compile != "none")] if cuda else ():
        runs.append(("tvl1-torch" + " compiled" * compiled, "cuda", args.gpu_pairs,
                     lambda g, c=compiled: time_backend(
                         make_backend("tvl1-torch", device="cuda", batch=args.batch, compile=c), g)))
    return runs


def print_table(rows: list[dict]) -> None:
    table = Table(title="TV-L1 flow: pairs/s and end-point error (px) on generated videos")
    for column in ("size", "backend", "device", "pairs", "pairs/s", "x OpenCV x1", "EPE truth", "EPE vs OpenCV"):
        table.add_column(column, justify="right" if column not in ("backend", "device") else "left")
    for r in rows:
        table.add_row(r["size"], r["backend"], r["device"], str(r["pairs"]), f"{r['pairs_per_s']:.2f}",
                      f"{r['speedup_vs_opencv_x1']:.2f}", f"{r['epe_truth']:.3f}", f"{r['epe_vs_opencv']:.4f}")
    Console(width=120).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x171,240x320", help="HxW list")
    ap.add_argument("--cpu-pairs", type=int, default=8, help="pairs for OpenCV (one worker) and torch CPU")
    ap.add_argument("--pool-pairs", type=int, default=0, help="pairs for the OpenCV pool (default 4 per worker)")
    ap.add_argument("--gpu-pairs", type=int, default=256, help="pairs for tvl1-torch on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="tvl1-torch pairs per call (default: 4 CPU, 64 GPU)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", choices=("none", "cuda", "all"), default="none",
                    help="also time tvl1-torch with compile=True on these devices (inductor; ~1 min warm-up on CPU)")
    ap.add_argument("--skip", default="", help="comma list of runs to leave out: pool, torch-cpu")
    ap.add_argument("--repeat", type=int, default=1, help="time each run this many times, keep the fastest")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the JSON record here, after every run (marked incomplete until the end)")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))

    cuda = torch.cuda.is_available()
    record = {
        "benchmark": "flow_speed",
        "cpu": cpu_name() or "unknown CPU", "cpu_count": os.cpu_count(), "workers": args.workers,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "versions": {"torch": torch.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "batch": args.batch, "results": []}
    runs = plan_runs(args, cuda)
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        gray, truth = make_video(max(pairs for *_, pairs, _ in runs), h, w)
        reference = None
        for backend, where, pairs, run in runs:
            seconds, flow = run(gray[:pairs + 1])
            for _ in range(args.repeat - 1):  # best of: the machine may be shared
                seconds = min(seconds, run(gray[:pairs + 1])[0])
            if reference is None:
                reference, base_rate = flow, pairs / seconds
            common = min(len(reference), len(flow))
            row = {"size": f"{h}x{w}", "backend": backend, "device": where, "pairs": pairs,
                   "pairs_per_s": pairs / seconds, "speedup_vs_opencv_x1": pairs / seconds / base_rate,
                   "epe_truth": truth_epe(flow, truth),
                   "epe_vs_opencv": end_point_error(flow[:common], reference[:common])}
            record["results"].append(row)
            print(json.dumps(row), flush=True)
            # A time limit may stop the run: what is done so far stays, marked as incomplete.
            if args.json:
                write_json_atomic(args.json, {**record, "error": "incomplete: the run stopped before its end"})

    print_table(record["results"])
    print(json.dumps(record))
    if args.json:
        write_json_atomic(args.json, record)


if __name__ == "__main__":
    main()
