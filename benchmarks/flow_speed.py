"""Flow extraction throughput and accuracy: OpenCV TV-L1 vs tvl1-torch, side by side.

Runs the production backends (preprocess.flow) on generated videos with known flow
(preprocess.flow_check) at each size: OpenCV's CPU DualTVL1 with one worker and with one
worker per core (a process pool, as preprocessing parallelises over videos), then tvl1-torch
on the CPU (all cores, batched) and, when CUDA is present, on the GPU. Prints a table and one
JSON line naming the devices and versions.

    python benchmarks/flow_speed.py                       # 128x171 and 240x320
    python benchmarks/flow_speed.py --sizes 240x320 --gpu-pairs 512 --batch 128 --compile cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from preprocess.flow import make_backend
from preprocess.flow_check import end_point_error, synthetic_video

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
    backend.compute(gray[:3])  # warm-up: device start, allocator, compilation
    start = time.perf_counter()
    flow = backend.compute(gray)  # returns host numpy: the device work is finished
    return time.perf_counter() - start, flow


def time_torch_cpu(gray: np.ndarray, threads: int, batch: int, compiled: bool) -> tuple[float, np.ndarray]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return time_backend(make_backend("tvl1-torch", device="cpu", batch=batch, compile=compiled), gray)
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x171,240x320", help="HxW list")
    ap.add_argument("--cpu-pairs", type=int, default=8, help="pairs for OpenCV (one worker) and torch CPU")
    ap.add_argument("--pool-pairs", type=int, default=0, help="pairs for the OpenCV pool (default 4 per worker)")
    ap.add_argument("--gpu-pairs", type=int, default=256, help="pairs for tvl1-torch on CUDA")
    ap.add_argument("--batch", type=int, default=64, help="tvl1-torch pairs per call")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", choices=("none", "cuda", "all"), default="none",
                    help="also time tvl1-torch with compile=True on these devices (inductor; ~1 min warm-up on CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON record to this file")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    pool_pairs = args.pool_pairs or 4 * args.workers
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        gray, truth = make_video(max(args.cpu_pairs, pool_pairs, args.gpu_pairs if cuda else 0), h, w)
        runs = [("opencv-tvl1", "cpu 1 proc", args.cpu_pairs,
                 lambda g: time_backend(make_backend("opencv-tvl1", threads=1), g)),
                ("opencv-tvl1", f"cpu {args.workers} procs", pool_pairs,
                 lambda g: time_opencv_pool(g, args.workers)),
                ("tvl1-torch", "cpu 1 thread", args.cpu_pairs, lambda g: time_torch_cpu(g, 1, args.batch, False))]
        if args.workers > 1:
            runs.append(("tvl1-torch", f"cpu {args.workers} threads", args.cpu_pairs,
                         lambda g: time_torch_cpu(g, args.workers, args.batch, False)))
        if args.compile == "all":
            runs.append(("tvl1-torch compiled", "cpu 1 thread", args.cpu_pairs,
                         lambda g: time_torch_cpu(g, 1, args.batch, True)))
        for compiled in (False, True)[:1 + (args.compile != "none")] if cuda else ():
            runs.append(("tvl1-torch" + " compiled" * compiled, "cuda", args.gpu_pairs,
                         lambda g, c=compiled: time_backend(
                             make_backend("tvl1-torch", device="cuda", batch=args.batch, compile=c), g)))
        reference = None
        for backend, where, pairs, run in runs:
            seconds, flow = run(gray[:pairs + 1])
            if reference is None:
                reference, base_rate = flow, pairs / seconds
            common = min(len(reference), len(flow))
            rows.append({"size": f"{h}x{w}", "backend": backend, "device": where, "pairs": pairs,
                         "pairs_per_s": pairs / seconds, "speedup_vs_opencv_x1": pairs / seconds / base_rate,
                         "epe_truth": truth_epe(flow, truth),
                         "epe_vs_opencv": end_point_error(flow[:common], reference[:common])})

    table = Table(title="TV-L1 flow: pairs/s and end-point error (px) on generated videos")
    for column in ("size", "backend", "device", "pairs", "pairs/s", "x OpenCV x1", "EPE truth", "EPE vs OpenCV"):
        table.add_column(column, justify="right" if column not in ("backend", "device") else "left")
    for r in rows:
        table.add_row(r["size"], r["backend"], r["device"], str(r["pairs"]), f"{r['pairs_per_s']:.2f}",
                      f"{r['speedup_vs_opencv_x1']:.2f}", f"{r['epe_truth']:.3f}", f"{r['epe_vs_opencv']:.4f}")
    Console(width=120).print(table)
    record = {
        "benchmark": "flow_speed",
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "workers": args.workers,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "versions": {"torch": torch.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "batch": args.batch, "results": rows}
    print(json.dumps(record))
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
