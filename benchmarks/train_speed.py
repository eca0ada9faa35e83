"""Stage-1 training throughput, side by side in one process (DESIGN.md "Performance principles").

Times the production step (`cvtcl.engine.train_step`: momentum update, query and key forward of
the clip and its M segments, the three loss terms, backward, Adam, enqueue) on synthetic inputs
for each variant, then optionally the real loader (`--data ROOT`) feeding the same step, which
gives the data-wait fraction. Prints a table and one JSON line naming the device and versions.

    python benchmarks/train_speed.py                          # S3D 16x32x128x128 on the GPU
    python benchmarks/train_speed.py --smoke                  # tiny backbone, seconds on CPU
    python benchmarks/train_speed.py --loader --data data/ucf101 --json out.json

Variants: precision (fp32; bf16 and fp16 on CUDA), channels_last_3d on/off, and the local segments
encoded in one batched call (production) vs one call per segment (the released code's way).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_toy_shards  # noqa: E402
from cvtcl import engine  # noqa: E402
from cvtcl.config import apply_overrides  # noqa: E402
from cvtcl.distributed import DistInfo, resolve_device  # noqa: E402
from cvtcl.presets import get_preset  # noqa: E402
from cvtcl.train import build_context, loader_arguments  # noqa: E402
from preprocess.schema import write_json_atomic  # noqa: E402

VARIANTS = ("fp32", "bf16", "fp16", "channels_last", "one_by_one")  # names for --variants
batched_encode = engine.encode_segments  # the production path; one variant swaps in segments_one_by_one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="s3d", choices=("s3d", "tiny"))
    parser.add_argument("--batch", type=int, default=16, help="clips per step (one process)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--modality", default="rgb", choices=("rgb", "flow"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (cuDNN autotune)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loader", action="store_true", help="also time the real loader feeding the step")
    parser.add_argument("--data", default=None, help="dataset root for --loader (default: write toy shards)")
    parser.add_argument("--gen-size", default="240x320", help="HxW of the toy shards' frames (UCF101's size)")
    parser.add_argument("--data-backend", default="dali", choices=("dali", "baseline"))
    parser.add_argument("--threads", type=int, default=4, help="DALI threads for --data")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma list of the variants to time (fp16 and bf16 only on CUDA; channels_last and "
                             "one_by_one run at the best precision); each costs a cuDNN autotune on the GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, 8x32x32 clips, 2 steps: checks the script")
    parser.add_argument("--json", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.batch, args.frames, args.crop, args.steps, args.warmup = "tiny", 4, 8, 32, 2, 1
        args.gen_size, args.threads = "24x32", 1
    args.loader = args.loader or args.data is not None
    return args


def make_config(args, amp: str, channels_last: bool, data_root: str = "unused"):
    queue = args.batch * math.ceil(2048 / args.batch)  # K near the paper's 2048, a multiple of the batch
    return apply_overrides(get_preset("ucf101-stage1-rgb"), [
        f"model.backbone={args.backbone}", f"data.batch_size={args.batch}", f"data.frames_per_clip={args.frames}",
        f"data.crop_size={args.crop}", f"stage.modality={args.modality}", f"loss.queue_size={queue}",
        f"optim.amp={amp}", f"model.channels_last_3d={channels_last}", f"data.root={data_root}",
        f"data.num_threads={args.threads}", f"data.backend={args.data_backend}",
    ])


def segments_one_by_one(encoder, segments):
    """The comparison point: one encoder call per segment ([B, M, ...] -> [B, M, D])."""
    return torch.stack([encoder(segments[:, m]) for m in range(segments.shape[1])], dim=1)


def synthetic_batch(args, device):
    channels = 3 if args.modality == "rgb" else 2
    clips = torch.randn(args.batch, 2, channels, args.frames, args.crop, args.crop, device=device)
    ids = torch.arange(args.batch, device=device)
    return {args.modality: clips, "video_index": ids, "group": ids, "label": ids}


def time_variant(args, dist, name, amp, channels_last, batched):
    config = make_config(args, amp, channels_last)
    ctx = build_context(config, dist)
    batch = synthetic_batch(args, dist.device)
    engine.encode_segments = batched_encode if batched else segments_one_by_one
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    try:
        for _ in range(args.warmup):
            engine.train_step(ctx, batch, 0, 0)
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.train_step(ctx, batch, 0, 0)  # ends with a CUDA synchronize
        seconds = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError as err:
        return {"variant": name, "error": f"out of memory: {str(err).splitlines()[0]}"}
    finally:
        engine.encode_segments = batched_encode
        del ctx
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"variant": name, "amp": amp, "channels_last_3d": channels_last, "segments_batched": batched,
            "samples_per_s": args.batch * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
            "peak_memory_gib": engine.peak_memory_gib(dist.device)}


def time_loader(args, dist, amp, root):
    """The real loader feeding the production step: clips/s and the share of time spent waiting for data."""
    from cvtcl.data import build_pretrain_loader

    config = make_config(args, amp, False, root)
    ctx = build_context(config, dist)
    loader = build_pretrain_loader(**loader_arguments(config, dist))
    steps = min(args.warmup + args.steps, loader.steps_per_epoch)
    waits, computes = [], []

    def on_step(epoch, epoch_step, values, data_s, compute_s):
        waits.append(data_s)
        computes.append(compute_s)
        return len(waits) >= steps

    engine.train_one_epoch(ctx, loader.epoch(0), 0, 0, on_step)
    waits, computes = waits[args.warmup :], computes[args.warmup :]
    total = sum(waits) + sum(computes)
    return {"variant": f"loader {args.data_backend} + step ({amp})", "amp": amp, "steps": len(waits),
            "samples_per_s": args.batch * len(waits) / total, "data_wait_fraction": sum(waits) / total}



def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dist = DistInfo(0, 0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    # CPU: fp32 only (fp16 autocast is CUDA-only; CPU bf16 conv3d backward is broken, see engine.amp_dtype).
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    best = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    wanted = set(filter(None, args.variants.split(",")))
    unknown = wanted - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    variants = [(p, p, False, True) for p in precisions if p in wanted]
    if "channels_last" in wanted:
        variants.append((f"{best} channels_last_3d", best, True, True))
    if "one_by_one" in wanted:
        variants.append((f"{best} segments one by one", best, False, False))
    record = {
        "benchmark": "train_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "backbone": args.backbone,
        "batch": args.batch, "frames": args.frames, "crop": args.crop, "modality": args.modality, "results": [],
    }
    for variant in variants:
        record["results"].append(time_variant(args, dist, *variant))
        # Written after every variant, so a timeout leaves the variants measured so far (marked incomplete).
        if args.json:
            incomplete = f"incomplete: stopped after {len(record['results'])} variants"
            write_json_atomic(args.json, record | {"error": incomplete})
    if args.loader:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                # enough toy shards for the timed steps
                root = args.data or write_toy_shards(
                    Path(tmp) / "shards", size=args.gen_size, num_videos=args.batch * (args.steps + args.warmup + 1),
                    frames=args.frames, with_flow=args.modality == "flow")
                record["results"].append(time_loader(args, dist, best, root))
            except Exception as err:  # fail soft: keep the synthetic variants, say why the loader failed
                record["results"].append({"variant": "loader", "error": f"{type(err).__name__}: {err}"[:2000]})

    reference = next((r for r in record["results"] if r["variant"] == "fp32" and "samples_per_s" in r), None)
    for r in record["results"]:
        if reference and "samples_per_s" in r:
            r["speedup_vs_fp32"] = r["samples_per_s"] / reference["samples_per_s"]
    print_table(record["results"])
    print(json.dumps(record))
    if args.json:
        write_json_atomic(args.json, record)
    return 0


def print_table(results):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stage-1 step throughput (one process)")
    for column in ("variant", "samples/s", "x fp32", "step ms", "peak GiB", "data wait"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else r.get("error", "-") if key == "samples_per_s" else "-"

        table.add_row(r["variant"], cell("samples_per_s", ".2f"), cell("speedup_vs_fp32", ".2f"), cell("step_ms", ".1f"),
                      cell("peak_memory_gib", ".2f"), cell("data_wait_fraction", ".1%"))
    Console(stderr=True).print(table)


if __name__ == "__main__":
    sys.exit(main())
