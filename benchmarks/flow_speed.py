"""Flow extraction throughput and accuracy: OpenCV TV-L1 vs tvl1-torch, side by side.

Runs the production backends (preprocess.flow) on generated videos with known flow
(preprocess.flow_check): shots of 9 frames back to back. Each backend runs two mixes of pairs:
"no cuts" (the pairs inside shots) and "cuts" (every consecutive pair, so one pair in 9 spans a
cut, never converges and runs all 7,500 inner iterations, as scene cuts do in real videos).
tvl1-torch gets its pairs in batches that span shots, as the flow workers of packing give them
(preprocess/flow_workers.py). Rows: OpenCV's CPU DualTVL1 in one process and in a pool of one
process per core; tvl1-torch eager (the reference) and the fused fast path (path=compiled) on the
CPU and, when CUDA is present, on the GPU. For each row: pairs/s per mix, the ratio to one OpenCV
process, end-point errors, and how long UCF101's ~2.5 M pairs would take at that rate (GPU rows:
every GPU of the machine). With --gpu-processes, rows of k flow-worker processes sharing one GPU:
the measurement behind packing's --flow-workers-per-gpu default (preprocess/flow_workers.py).
tvl1-torch rows also give the pixel-iterations they ran per pair and, on a GPU, the least memory
traffic of those against the peak bandwidth; --profile adds, per CUDA row and mix, one batch under
torch.profiler (top kernels, GPU busy fraction, kernels per batch).
Without a CUDA device the GPU rows are skipped: a note on stderr names them and why (`skipped` in
the JSON). Prints a table and one JSON line naming the devices and versions.

    python benchmarks/flow_speed.py                       # 128x171 and 240x320
    python benchmarks/flow_speed.py --sizes 240x320 --gpu-pairs 512 --compile cuda --skip torch-cpu
    python benchmarks/flow_speed.py --sizes 240x320 --gpu-processes 2,3 --skip pool,torch-cpu  # workers per GPU
"""

from __future__ import annotations

import argparse
import json
import os
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

from benchmarks.common import (  # noqa: E402
    ArgumentParser,
    cpu_name,
    header,
    json_path,
    non_negative_int,
    parse_size,
    peak_memory_bandwidth,
    positive_int,
    positive_ints,
    profile_kernels,
    run_script,
)
from cvtcl.capture import share_compile_threads  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402
from preprocess.flow import make_backend  # noqa: E402
from preprocess.flow_check import end_point_error, synthetic_video  # noqa: E402
from preprocess.flow_torch import ITERATION_BYTES  # noqa: E402
from preprocess.flow_workers import PairBatcher  # noqa: E402
from preprocess.schema import write_json_atomic  # noqa: E402

SEGMENT = 9  # frames per generated shot; pairs across two shots are cuts without ground truth
UCF101_PAIRS = 2_500_000  # 13,320 videos, ~2.49 M frames
MIXES = ("no cuts", "cuts")


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


def mix_pairs(truth: np.ndarray, mix: str) -> np.ndarray:
    """First frames of the mix's pairs: all of them, or those inside a shot."""
    return np.arange(len(truth)) if mix == "cuts" else np.flatnonzero(~np.isnan(truth[:, 0, 0, 0]))


_worker_backend = None


def _pool_init() -> None:
    global _worker_backend
    _worker_backend = make_backend("opencv-tvl1", threads=1)


def _pool_pair(pair: np.ndarray) -> np.ndarray:
    return _worker_backend.compute(pair)[0]


def time_opencv_pool(gray: np.ndarray, first: np.ndarray, workers: int) -> tuple[float, np.ndarray, dict]:
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_pool_init) as pool:
        list(pool.map(_pool_pair, [gray[:2]] * workers))  # start and warm every worker
        start = time.perf_counter()
        flow = np.stack(list(pool.map(_pool_pair, [gray[i:i + 2] for i in first])))
        return time.perf_counter() - start, flow, {}


def time_opencv(gray: np.ndarray, first: np.ndarray) -> tuple[float, np.ndarray, dict]:
    backend = make_backend("opencv-tvl1", threads=1)
    backend.compute(gray[:2])
    start = time.perf_counter()
    flow = np.stack([backend.compute(gray[i:i + 2])[0] for i in first])
    return time.perf_counter() - start, flow, {}


def solve_batched(backend, gray: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The mix's pairs in batches that span videos, as a flow worker runs them; each run of
    consecutive pairs is one video of the batcher (a shot without cuts, all of it with cuts)."""
    batcher, flows = PairBatcher(backend.batch), {}
    bounds = np.flatnonzero(np.diff(first) != 1) + 1  # runs of consecutive pairs
    for run in np.split(first, bounds):
        batcher.add(int(run[0]), gray[run[0]:run[-1] + 2])
    while batcher.pending:
        frames, index, pieces = batcher.next_batch()
        flows.update(batcher.put(pieces, backend.compute_pairs(frames, index)))
    return np.concatenate([flows[int(run[0])] for run in np.split(first, bounds)])


def warm_up(backend, gray: np.ndarray, first: np.ndarray) -> None:
    """Device start, allocator, compilation (one serves every bucket: shapes are dynamic) and the
    CUDA graphs of the chunks (one per level and bucket, captured in the second batch that meets
    them): a batch of the mix's first pairs, a cut among them in the cuts mix, so its buckets
    down to the smallest are met; twice with graphs."""
    for _ in range(1 if backend.graphs is None else 2):
        solve_batched(backend, gray, first[:backend.batch])


def work_info(pixel_iterations: int, pairs: int, seconds: float, cuda: bool) -> dict:
    """The inner iterations a tvl1-torch row ran (pixels x iterations per pair, frozen and padding
    rows included) and, on a GPU, the least memory traffic of that work per second against the
    GPU's peak bandwidth: near 1, only fewer bytes per iteration would go faster; far below, the
    time goes elsewhere (launches, host reads, small batches)."""
    info = {"pixel_iterations_per_pair": pixel_iterations / pairs}
    if cuda:
        rate = pixel_iterations * ITERATION_BYTES / seconds
        info["floor_traffic_gb_per_s"] = rate / 1e9
        peak = peak_memory_bandwidth()
        if peak:
            info["of_peak_bandwidth"] = rate / peak
    return info


def profile_batch(backend, gray: np.ndarray, first: np.ndarray) -> dict:
    """The mix's first batch once more under torch.profiler (a cut among its pairs in the cuts
    mix): the top kernels, the GPU busy fraction and kernels per batch. The profiler (CUPTI) may
    misplace kernels replayed from CUDA graphs: compare with the no-graphs row."""
    try:
        return profile_kernels(lambda: solve_batched(backend, gray, first[:backend.batch]), 1,
                               lambda: torch.cuda.synchronize(backend.device), per="batch")
    except Exception as err:  # the profiler failing: the row's timing stands
        return {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}


def time_torch(backend, gray: np.ndarray, first: np.ndarray, profile: bool = False) -> tuple[float, np.ndarray, dict]:
    start = time.perf_counter()
    warm_up(backend, gray, first)
    warm_up_s = time.perf_counter() - start  # the first mix's: the compile (the process's first) and captures
    before = backend.work.pixel_iterations
    start = time.perf_counter()
    flow = solve_batched(backend, gray, first)  # returns host numpy: the device work is finished
    seconds = time.perf_counter() - start
    graphs = backend.graphs
    info = {"warm_up_s": warm_up_s,
            **work_info(backend.work.pixel_iterations - before, len(first), seconds, backend.device.type == "cuda")}
    if graphs is not None:
        info["cuda_graphs"] = {"captured": len(graphs.graphs), "error": graphs.error}
    if profile and backend.device.type == "cuda":  # run by main() once every row is written
        info["profile_later"] = lambda: profile_batch(backend, gray, first)
    return seconds, flow, info


_barrier = None


def _gpu_init(barrier, processes: int) -> None:
    """A spawned flow-worker process, set up as packing sets up its own (flow_workers.flow_worker)."""
    global _barrier
    _barrier = barrier
    share_compile_threads(processes)


def _gpu_process(task: tuple) -> tuple[float, np.ndarray, int]:
    gray, first, batch = task
    try:
        backend = make_backend("tvl1-torch", device="cuda", path="compiled", batch=batch)
        warm_up(backend, gray, first)
    except BaseException:
        _barrier.abort()  # the other processes stop waiting for this one (BrokenBarrierError) instead of hanging
        raise
    _barrier.wait()  # every process starts timing together
    before = backend.work.pixel_iterations
    start = time.perf_counter()
    flow = solve_batched(backend, gray, first)
    return time.perf_counter() - start, flow, backend.work.pixel_iterations - before


def time_gpu_processes(gray: np.ndarray, first: np.ndarray, processes: int, batch) -> tuple[float, np.ndarray, dict]:
    """`processes` flow workers sharing one GPU, each solving the whole mix, as packing runs
    --flow-workers-per-gpu of them: -> (seconds per mix's worth of pairs, one worker's flow)."""
    ctx = get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_gpu_init,
                             initargs=(ctx.Barrier(processes), processes)) as pool:
        results = list(pool.map(_gpu_process, [(gray, first, batch)] * processes))
    seconds = max(seconds for seconds, *_ in results)
    work = sum(pixel_iterations for *_, pixel_iterations in results)
    return seconds / processes, results[0][1], work_info(work, processes * len(first), seconds, cuda=True)


def plan_runs(args, cuda: bool) -> list[tuple]:
    """(backend, where, pairs, run(gray, first) -> (seconds, flow, info)) in the order a time
    limit that stops the run early costs least: the default fast path first, then one OpenCV
    process (every ratio and EPE against OpenCV needs it), then the rest. On CUDA the fast path
    runs with its chunks as CUDA graphs (the default) and without, side by side."""
    torch_backend = lambda device, path, threads=1, graphs=None: make_backend(  # noqa: E731
        "tvl1-torch", device=device, path=path, batch=args.batch, threads=threads, graphs=graphs)
    runs = []
    for path, graphs in (((("compiled", None), ("compiled", False)) if args.compile != "none" else ())
                         + ((("eager", None),) if "eager-cuda" not in args.skip else ())) if cuda else ():
        name = f"tvl1-torch {path}" + (", no graphs" if graphs is False else "")
        runs.append((name, "cuda", args.gpu_pairs,
                     lambda g, f, p=path, c=graphs: time_torch(torch_backend("cuda", p, graphs=c), g, f, args.profile)))
    for processes in args.gpu_processes if cuda and args.compile != "none" else ():
        runs.append(("tvl1-torch compiled", f"cuda, {processes} processes", args.gpu_pairs,
                     lambda g, f, k=processes: time_gpu_processes(g, f, k, args.batch)))
    runs.insert(min(1, len(runs)), ("opencv-tvl1", "cpu 1 proc", args.cpu_pairs, time_opencv))
    if "pool" not in args.skip:
        runs.append(("opencv-tvl1", f"cpu pool of {args.workers}", args.pool_pairs or 4 * args.workers,
                     lambda g, f: time_opencv_pool(g, f, args.workers)))
    if "torch-cpu" not in args.skip:
        for threads in sorted({1, args.workers}):
            runs.append(("tvl1-torch eager", f"cpu {threads} thread(s)", args.cpu_pairs,
                         lambda g, f, t=threads: time_torch(torch_backend("cpu", "eager", t), g, f)))
        if args.compile == "all":
            runs.append(("tvl1-torch compiled", "cpu 1 thread(s)", args.cpu_pairs,
                         lambda g, f: time_torch(torch_backend("cpu", "compiled"), g, f)))
    return runs


def skipped_gpu_rows(args, cuda: bool) -> dict | None:
    """The GPU rows the flags ask for that this machine cannot run, and why: without a CUDA device
    the run ends with the CPU rows only and exits 0, which reads as if the GPU had nothing to show."""
    if cuda:
        return None
    rows = [f"{backend} on {where}" for backend, where, *_ in plan_runs(args, cuda=True) if where.startswith("cuda")]
    if not rows:
        return None
    return {"reason": f"torch {torch.__version__} sees no CUDA device", "rows": rows}


def compare(rows: list[dict], gpus: int) -> None:
    """Fill the columns against one OpenCV process (same size, same pairs) and the estimates."""
    for row in rows:
        base = next((r for r in rows if r["size"] == row["size"] and r["device"] == "cpu 1 proc"), None)
        for mix in MIXES:
            cell = row[mix]
            if base is not None:
                cell["speedup_vs_opencv_x1"] = cell["pairs_per_s"] / base[mix]["pairs_per_s"]
                # pairs with a true flow only: at a cut neither solver converges, and 7,500
                # iterations of float rounding later their flows differ by more than the limit
                common = min(len(base[mix]["flow"]), len(cell["flow"]))
                keep = cell["true"][:common]
                cell["epe_vs_opencv"] = end_point_error(cell["flow"][:common][keep], base[mix]["flow"][:common][keep])
        # Real videos cut less often than one pair in 9: the two mixes bound the estimate.
        scale = gpus if row["device"].startswith("cuda") else 1
        row["ucf101_hours"] = [UCF101_PAIRS / (row[mix]["pairs_per_s"] * scale) / 3600 for mix in MIXES]


def public(row: dict) -> dict:
    if "error" in row:
        return row
    return {**row, **{mix: {k: v for k, v in row[mix].items() if k not in ("flow", "true")} for mix in MIXES}}


def work_cell(cell: dict) -> str:
    """A tvl1-torch row's work per pair with cuts, and on a GPU the share of its peak bandwidth
    that work's least traffic takes."""
    if "pixel_iterations_per_pair" not in cell:
        return "-"
    text = f"{cell['pixel_iterations_per_pair'] / 1e6:.3g}M"
    return text + (f" {cell['of_peak_bandwidth']:.0%}" if "of_peak_bandwidth" in cell else "")


def print_table(rows: list[dict]) -> None:
    table = Table(title="TV-L1 flow: pairs/s without and with scene cuts (1 in 9), end-point error (px); work: "
                        "pixel-iterations per pair with cuts, and (GPU) their least traffic / peak bandwidth")
    columns = ("size", "backend", "device", "pairs", "no cuts /s", "cuts /s", "x OpenCV x1", "EPE truth",
               "EPE vs OpenCV", "UCF101 h", "work")
    for column in columns:
        table.add_column(column, justify="left" if column in ("backend", "device") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["size"], r["backend"], r["device"], str(r["pairs"]), r["error"][:60], *["-"] * 6)
            continue
        fast, cut = r["no cuts"], r["cuts"]
        ratio = "/".join(f"{c['speedup_vs_opencv_x1']:.1f}" for c in (fast, cut) if "speedup_vs_opencv_x1" in c)
        table.add_row(r["size"], r["backend"], r["device"], str(r["pairs"]), f"{fast['pairs_per_s']:.2f}",
                      f"{cut['pairs_per_s']:.2f}", ratio or "-", f"{fast['epe_truth']:.3f}",
                      f"{fast.get('epe_vs_opencv', float('nan')):.4f}",
                      "{:.1f}-{:.1f}".format(*r["ucf101_hours"]), work_cell(cut))
    Console(width=150).print(table)


SKIPPABLE = ("pool", "torch-cpu", "eager-cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128x171,240x320", help="HxW list")
    ap.add_argument("--cpu-pairs", type=positive_int, default=8, help="pairs for OpenCV (one worker) and torch CPU")
    ap.add_argument("--pool-pairs", type=non_negative_int, default=0,
                    help="pairs for the OpenCV pool (default 4 per worker)")
    ap.add_argument("--gpu-pairs", type=positive_int, default=256, help="pairs for tvl1-torch on CUDA")
    ap.add_argument("--batch", type=positive_int, default=None,
                    help="tvl1-torch pairs per batch (default: 4 CPU, 64 GPU)")
    ap.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                    help="OpenCV pool size (default: all cores)")
    ap.add_argument("--compile", choices=("none", "cuda", "all"), default="cuda",
                    help="time the fast path (path=compiled) on these devices (inductor; minutes of warm-up on CPU)")
    ap.add_argument("--gpu-processes", type=positive_ints, default=[],
                    help="comma list of flow workers per GPU to time side by side (e.g. 2,3): how many to run")
    ap.add_argument("--skip", default="", help=f"comma list of runs to leave out: {', '.join(SKIPPABLE)}")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA rows: one batch per mix under torch.profiler (top kernels, GPU busy fraction)")
    ap.add_argument("--json", type=json_path, default=None,
                    help="write the JSON record here, after every run (marked incomplete until the end)")
    args = ap.parse_args(argv)
    args.shapes = [parse_size(size, "--sizes") for size in args.sizes.split(",")]  # (H, W) each
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - set(SKIPPABLE):
        raise UsageError(f"--skip: unknown {', '.join(sorted(args.skip - set(SKIPPABLE)))}; "
                         f"choose from {', '.join(SKIPPABLE)}")
    return args


def publish(record: dict, rows: list[dict], path: Path | None, row: dict) -> None:
    """The rows so far into the record, `row` (new or updated) printed; with --json, written as
    incomplete: a time limit may stop the run, and what is done so far stays."""
    record["results"] = [public(r) for r in rows]
    print(json.dumps(public(row)), flush=True)
    if path:
        write_json_atomic(path, {**record, "error": "incomplete: the run stopped before its end"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    record = {
        **header("flow_speed", "cuda" if cuda else "cpu"),  # the GPU's name, or the CPU's without one
        "cpu": cpu_name() or "unknown CPU", "cpu_count": os.cpu_count(), "workers": args.workers,
        "gpu": torch.cuda.get_device_name() if cuda else None, "gpus": gpus,
        "load_average_1min": os.getloadavg()[0],  # a shared machine slows the wall-clock rates
        "batch": args.batch, "ucf101_pairs": UCF101_PAIRS, "results": []}
    record["versions"]["opencv"] = cv2.__version__  # in use before the OpenCV rows run
    runs = plan_runs(args, cuda)
    skipped = skipped_gpu_rows(args, cuda)
    if skipped:  # said once more after the table, where the rows are missing
        record["skipped"] = skipped
    rows, profiles = [], []
    for h, w in args.shapes:
        gray, truth = make_video(max(pairs for *_, pairs, _ in runs), h, w)
        for backend, where, pairs, run in runs:
            row = {"size": f"{h}x{w}", "backend": backend, "device": where, "pairs": pairs}
            try:
                for mix in MIXES:
                    first = mix_pairs(truth[:pairs], mix)
                    seconds, flow, info = run(gray, first)
                    if "profile_later" in info:
                        profiles.append((row, mix, info.pop("profile_later")))
                    keep = ~np.isnan(truth[first, 0, 0, 0])
                    row[mix] = {"pairs_per_s": len(first) / seconds, "flow": flow, "true": keep,
                                "epe_truth": end_point_error(flow[keep], truth[first][keep]), **info}
            except Exception as err:  # fail soft (OpenCV without contrib, a compiler error): keep the other rows
                row = {**{k: row[k] for k in ("size", "backend", "device", "pairs")},
                       "error": f"{type(err).__name__}: {err}"[:500]}
                print(f"{backend} on {where}: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
            compare([r for r in rows if "error" not in r], gpus)
            publish(record, rows, args.json, row)
    # Profiles last: every timing is written before the profiler (CUPTI, under CUDA graphs too) runs.
    for row, mix, profile in profiles:
        if any(r is row for r in rows):  # not a row that failed in its other mix
            row[mix]["profile"] = profile()
            publish(record, rows, args.json, row)

    failed = [f"{r['backend']} on {r['device']}" for r in rows if "error" in r]
    if failed:
        record["error"] = f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)} (see their rows)"
    print_table(rows)
    if skipped:
        print(f"note: {len(skipped['rows'])} GPU row(s) skipped, {skipped['reason']}: {'; '.join(skipped['rows'])}",
              file=sys.stderr)
    print(json.dumps(record))
    if args.json:
        write_json_atomic(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("flow_speed.py", main))
