"""Loader throughput: the DALI pipeline against the baseline DataLoader, on the same shards.

    python benchmarks/loader_speed.py [--shards DIR] [--device cpu|cuda] [--batch N] [--workers N]
                                      [--frames T] [--crop S] [--steps N]

Both loaders run the production code path (`cvtcl.data.build_pretrain_loader`, stage-1 sampling:
two augmented copies, colour on) after warm-up steps. Reported per loader: decoded + augmented
output frames/s (B x V x T per step), samples/s, clips/s (B x V), CPU-seconds per frame (this
process and every descendant: DALI/DataLoader workers included), and the DALI/baseline ratio.
Consumption (docs/design.md "Performance principles"): a stage-1 sample is 2 copies x 32 frames; the
paper's 8 x TITAN Xp train ~25 samples/s each, an H100's roofline is ~1300 samples/s (stated, not
measured here unless --step-rate gives a measured trainer rate); headroom = loader frames/s over
the frames/s training consumes. Integrity check (shard layout 2): the time of the reader's
checked read (one contiguous read + every frame's crc32, the production path of both loaders)
against the bare read, per frame, and the difference as a share of the DALI loader's CPU time
per frame. Without --shards, small synthetic shards are written by the real shard writer. Prints
a rich table and one JSON line naming device and versions.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ArgumentParser,
    check_device,
    fraction,
    header,
    json_path,
    non_negative_int,
    parse_size,
    positive_float,
    positive_int,
    run_script,
    user_input,
    write_toy_shards,
)
from cvtcl.errors import UsageError  # noqa: E402

BACKENDS = ("baseline", "dali")  # for --backends

FRAMES_PER_SAMPLE = 2 * 32  # stage 1: two copies of a 32-frame clip
PAPER_SAMPLES_PER_S = 8 * 25  # 8 TITAN Xp at ~25 stage-1 samples/s each (docs/design.md)
H100_ROOFLINE_SAMPLES_PER_S = 1300  # docs/design.md, S3D stage 1 on one H100


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children and its live descendants (from /proc)."""
    me_usage, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me_usage.ru_utime + me_usage.ru_stime + reaped.ru_utime + reaped.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    me, live = os.getpid(), 0.0
    for pid, (ppid, used) in parents.items():
        chain, p = set(), ppid
        while p in parents and p not in chain and p != me:
            chain.add(p)
            p = parents[p][0]
        if p == me and pid != me:
            live += used
    return total + live


def run_loader(backend: str, args, root) -> dict:
    from cvtcl.data import build_pretrain_loader

    loader = build_pretrain_loader(
        root, subset="train", batch_size=args.batch, frames_per_clip=args.frames, crop_size=args.crop,
        num_segments=args.segments, device=args.device, num_threads=args.threads, num_workers=args.workers,
        backend=backend, dtype=torch.float16 if args.device == "cuda" else torch.float32,
        hw_decoder_load=args.hw_decoder_load,
    )
    stream = (b for e in itertools.count() for b in loader.epoch(e))
    for _ in range(args.warmup):
        next(stream)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    sync()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if hasattr(loader, "close"):
        loader.close()
    frames = args.steps * args.batch * 2 * args.frames
    return {"frames_per_s": frames / wall, "samples_per_s": args.steps * args.batch / wall,
            "clips_per_s": 2 * args.steps * args.batch / wall, "cpu_s_per_frame": cpu / frames,
            "cpu_cores_busy": cpu / wall, "wall_s": wall}


def integrity_check_cost(root, frames: int, repeats: int = 5) -> dict:
    """Microseconds per RGB frame: the reader's checked read vs the bare contiguous read of the
    same windows (what readers did before per-frame checksums), best of `repeats` passes."""
    from preprocess.shards import ShardReader, read_frames

    reader = ShardReader(root)
    windows = [(v, min(frames, v.num_frames)) for v in reader.videos]
    count = sum(n for _, n in windows)

    def best(read) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for video, n in windows:
                read(video, n)
            times.append(time.perf_counter() - t0)
        return min(times) / count * 1e6

    def bare(video, n):
        offsets, _, blob = reader._tables_of(video.shard, "rgb", reader._file(video.shard))
        return read_frames(blob, offsets[video.rgb_start : video.rgb_start + n + 1])

    checked = best(lambda video, n: reader.read_rgb(video, 0, n))
    unchecked = best(bare)
    reader.close()
    return {"frames": count, "checked_read_us_per_frame": checked, "bare_read_us_per_frame": unchecked,
            "check_us_per_frame": checked - unchecked}


def consumption(step_rate: float | None) -> dict:
    if step_rate:
        present, how = step_rate, "measured trainer rate (--step-rate)"
    else:
        present, how = H100_ROOFLINE_SAMPLES_PER_S, "H100 roofline, stated in docs/design.md (not measured)"
    return {"paper_8x_titan_xp_frames_per_s": PAPER_SAMPLES_PER_S * FRAMES_PER_SAMPLE,
            "present_gpu_frames_per_s": present * FRAMES_PER_SAMPLE, "present_gpu_basis": how}


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="packed dataset directory (default: write synthetic shards)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--workers", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2, help="DALI CPU threads")
    parser.add_argument("--frames", type=positive_int, default=32)
    parser.add_argument("--crop", type=positive_int, default=128)
    parser.add_argument("--segments", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--gen-size", default="240x320", help="HxW of synthetic frames")
    parser.add_argument("--gen-videos", type=non_negative_int, default=0,
                        help="synthetic videos (default: enough for one pass)")
    parser.add_argument("--hw-decoder-load", type=fraction, default=0.65, help="share of JPEGs for the HW decoder")
    parser.add_argument("--step-rate", type=positive_float, default=None, help="measured trainer samples/s on this GPU")
    parser.add_argument("--backends", default="baseline,dali", help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--json", type=json_path, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    parse_size(args.gen_size, "--gen-size")
    backends = args.backends.split(",")
    if not set(backends) <= set(BACKENDS) or len(set(backends)) < len(backends):
        raise UsageError(f"--backends {args.backends}: a comma list of {' and/or '.join(BACKENDS)}, each once")
    check_device(args.device)  # the loaders would record torch's error and the report then raise it
    if args.shards is not None:
        from preprocess.schema import LayoutError, load_manifest

        with user_input(FileNotFoundError, LayoutError):  # says what --shards must hold
            load_manifest(args.shards)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards
        if root is None:
            root = write_toy_shards(Path(tmp) / "shards", size=args.gen_size, frames=args.frames,
                                    num_videos=args.gen_videos or args.batch * (args.steps + args.warmup))
        results = {}
        for backend in backends:
            try:
                results[backend] = run_loader(backend, args, root)
            except Exception as err:  # fail soft: report which loader failed and why, keep the other
                results[backend] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        integrity = integrity_check_cost(root, args.frames)
    for res in results.values():
        if "cpu_s_per_frame" in res:
            res["integrity_check_share_of_cpu"] = integrity["check_us_per_frame"] * 1e-6 / res["cpu_s_per_frame"]
    need = consumption(args.step_rate)
    for res in results.values():
        if "frames_per_s" in res:
            res["headroom_paper"] = res["frames_per_s"] / need["paper_8x_titan_xp_frames_per_s"]
            res["headroom_present_gpu"] = res["frames_per_s"] / need["present_gpu_frames_per_s"]
    ok = all("frames_per_s" in results.get(b, {}) for b in ("dali", "baseline"))
    report = {
        **header("loader_speed", args.device),
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"shards": str(args.shards or "synthetic")},
        "results": results, "consumption": need, "integrity_check": integrity,
        "ratio_dali_over_baseline": results["dali"]["frames_per_s"] / results["baseline"]["frames_per_s"] if ok else None,
    }
    print_table(report)
    line = json.dumps(report, sort_keys=True)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return report


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loader_speed on {report['device']}")
    for col in ("loader", "frames/s", "samples/s", "clips/s", "CPU-s/frame", "cores busy", "headroom 8xTITAN Xp",
                "headroom present GPU"):
        table.add_column(col, justify="right")
    for name, res in report["results"].items():
        if "error" in res:
            table.add_row(name, "error: " + res["error"][:60], *[""] * 6)
            continue
        table.add_row(name, f"{res['frames_per_s']:.0f}", f"{res['samples_per_s']:.1f}", f"{res['clips_per_s']:.1f}",
                      f"{res['cpu_s_per_frame'] * 1e3:.3f} ms", f"{res['cpu_cores_busy']:.2f}",
                      f"{res['headroom_paper']:.3f}", f"{res['headroom_present_gpu']:.3f}")
    Console(stderr=True, width=160).print(table)
    ratio = report["ratio_dali_over_baseline"]
    Console(stderr=True).print(f"DALI / baseline frames/s: {ratio:.2f}" if ratio else "DALI / baseline: n/a",
                               f"(present GPU basis: {report['consumption']['present_gpu_basis']})")
    check = report["integrity_check"]
    shares = ", ".join(f"{name} {res['integrity_check_share_of_cpu']:.2%}" for name, res in report["results"].items()
                       if "integrity_check_share_of_cpu" in res)
    Console(stderr=True).print(
        f"integrity check: read {check['checked_read_us_per_frame']:.1f} us/frame with crc32, "
        f"{check['bare_read_us_per_frame']:.1f} without (+{check['check_us_per_frame']:.1f} us; "
        f"share of the loaders' CPU per frame: {shares or 'n/a'})")


if __name__ == "__main__":
    sys.exit(run_script("loader_speed.py", main))
