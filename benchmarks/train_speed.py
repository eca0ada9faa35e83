"""Training-step throughput, side by side in one process (docs/design.md "Performance principles").

Times the production step (`cvtcl.engine.train_step`: momentum update, query and key forward of
the clip and its M segments, the three loss terms, backward, Adam, enqueue) on synthetic inputs
for each variant, then optionally the real loader (`--data ROOT`) feeding the same step, which
gives the data-wait fraction. Prints a table and one JSON line naming the device and versions.

    python benchmarks/train_speed.py                          # S3D 16x32x128x128 on the GPU
    python benchmarks/train_speed.py --smoke                  # tiny backbone, seconds on CPU
    python benchmarks/train_speed.py --variants legacy,bf16,bf16+graph --profile --json out.json
    python benchmarks/train_speed.py --loader --data data/ucf101 --json out.json

Variants (--variants, comma list; NAME+graph / +encoder / +step sets run.compile; NAME+calls is
run.compile=graph with run.graph_scope=calls, each encoder call its own graphs as under torchrun,
timed here in one process): `legacy` is the
old eager step (run.legacy_step: a host sync per step, two key-encoder calls), the baseline row;
fp32, bf16, fp16 (CUDA) the sync-free step; channels_last (bf16 + channels_last_3d), batch64
(bf16 at --big-batch clips), cotrain (stage 2 with a frozen flow sampler, bf16). (The segments
encoded one call each, measured against one batched call on 2026-11-26, is no longer a row: the
key permutations are now drawn for the batched call before the step.) On the CPU bf16/fp16 rows are skipped and the others run in
fp32. Each row is timed between two device synchronisations around the timed steps (the step
itself no longer synchronises); what came before them (the model, cuDNN's autotune, a compile,
the captures, stage 2's queue filling) is the row's `warmup_s`. `--profile` adds the top-20 CUDA kernels by time, the fraction of
wall time the GPU is busy and the kernel count per step (torch.profiler, CUDA only), the cuDNN
version, and the launches per step of the new and the legacy step counted on the meta device,
with the step's FLOPs per sample, which give each row its TFLOP/s (`tflop_per_s`), and its eager
fp32 memory traffic per sample. What it is doing (the variant, its warm-up, its timing, the
result) goes to stderr as it goes, with the table: an S3D row takes minutes on a CPU. stdout's last
line is the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ArgumentParser,
    check_device,
    header,
    json_path,
    non_negative_int,
    parse_size,
    positive_int,
    profile_kernels,
    run_script,
    user_input,
    write_toy_shards,
)
from cvtcl import engine, graphed  # noqa: E402
from cvtcl.config import COMPILE_MODES, apply_overrides  # noqa: E402
from cvtcl.distributed import DistInfo, resolve_device  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402
from cvtcl.presets import get_preset  # noqa: E402
from cvtcl.train import build_context, loader_arguments  # noqa: E402
from preprocess.schema import write_json_atomic  # noqa: E402

VARIANTS = ("legacy", "fp32", "bf16", "fp16", "channels_last", "batch64", "cotrain")  # for --variants
COMPILE = (*COMPILE_MODES, "calls")  # NAME+graph / +encoder / +step; +calls: run.compile=graph, run.graph_scope=calls


def say(message: str) -> None:
    """A progress line on stderr, at once (the table goes there too; stdout ends with the JSON)."""
    print(f"train_speed: {message}", file=sys.stderr, flush=True)


DEFAULT_VARIANTS = ("legacy,fp32,fp32+graph,bf16,bf16+graph,bf16+step,channels_last,channels_last+graph,batch64,"
                    "batch64+graph,cotrain,cotrain+graph")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="s3d", choices=("s3d", "tiny"))
    parser.add_argument("--batch", type=positive_int, default=16, help="clips per step (one process)")
    parser.add_argument("--big-batch", type=positive_int, default=64, help="clips per step of the batch64 variant")
    parser.add_argument("--frames", type=positive_int, default=32)
    parser.add_argument("--crop", type=positive_int, default=128)
    parser.add_argument("--modality", default="rgb", choices=("rgb", "flow"))
    parser.add_argument("--queue", type=positive_int, default=2048,
                        help="negatives K (the paper's 2048; stage 2 fills it first)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed steps per variant (cuDNN autotune, compile)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loader", action="store_true", help="also time the real loader feeding the step")
    parser.add_argument("--data", default=None, help="dataset root for --loader (default: write toy shards)")
    parser.add_argument("--gen-size", default="240x320", help="HxW of the toy shards' frames (UCF101's size)")
    parser.add_argument("--data-backend", default="dali", choices=("dali", "baseline"))
    parser.add_argument("--threads", type=positive_int, default=4, help="DALI threads for --data")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma list of NAME or NAME+COMPILE; names {','.join(VARIANTS)}, compile "
                             f"{','.join(COMPILE[1:])}; each costs a cuDNN autotune (and a compile) on the GPU")
    parser.add_argument("--profile", action="store_true", help="kernels, GPU busy fraction, launches per step")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, 8x32x32 clips, 2 steps: checks the script")
    parser.add_argument("--json", type=json_path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.smoke:  # its sizes as defaults: a flag given with it keeps its value (they replaced them)
        parser.set_defaults(backbone="tiny", batch=4, frames=8, crop=32, steps=2, warmup=1, gen_size="24x32",
                            threads=1, big_batch=8, queue=64)
        args = parser.parse_args(argv)
    parse_size(args.gen_size, "--gen-size")
    args.loader = args.loader or args.data is not None
    return args


def check_loader_steps(args) -> None:
    """--data: an epoch (the loader's timing stops at its end) must hold more steps than the
    untimed --warmup, or no step is timed. Checked from the manifest before any row is timed."""
    from dali_pipelines.sampling import steps_per_epoch
    from preprocess.schema import LayoutError, load_manifest

    data = make_config(args, "fp32", False, args.data).data
    with user_input(FileNotFoundError, LayoutError):  # says what --data must hold
        splits = load_manifest(args.data).splits
    videos = len(splits.get(data.split, {}).get(data.subset, []))
    steps = steps_per_epoch(videos, args.batch, 1)
    if steps <= args.warmup:
        raise UsageError(f"--data {args.data}: its {videos} {data.subset} videos (split {data.split}) make {steps} "
                         f"step(s) of --batch {args.batch} an epoch, not more than --warmup {args.warmup}: no step "
                         "would be timed; lower --warmup or --batch")


def make_config(args, amp: str, channels_last: bool, data_root: str = "unused", batch: int | None = None,
                legacy: bool = False, compile_setting: str = "none", sampler: str = ""):
    batch = batch or args.batch
    queue = batch * math.ceil(args.queue / batch)  # K near --queue (the paper's 2048), a multiple of the batch
    stage = ["stage.kind=cotrain", f"stage.sampler_checkpoint={sampler}"] if sampler else []
    return apply_overrides(get_preset("ucf101-stage1-rgb"), [
        f"model.backbone={args.backbone}", f"data.batch_size={batch}", f"data.frames_per_clip={args.frames}",
        f"data.crop_size={args.crop}", f"stage.modality={args.modality}", f"loss.queue_size={queue}",
        f"optim.amp={amp}", f"model.channels_last_3d={channels_last}", f"data.root={data_root}",
        f"data.num_threads={args.threads}", f"data.backend={args.data_backend}", f"run.legacy_step={legacy}",
        f"run.compile={'graph' if compile_setting == 'calls' else compile_setting}",
        f"run.graph_scope={'calls' if compile_setting == 'calls' else 'auto'}", *stage,
    ])


def synthetic_batch(args, device, batch=None, cotrain=False):
    b = batch or args.batch
    ids = torch.arange(b, device=device)
    out = {"video_index": ids, "group": ids, "label": ids}
    for modality in ({"rgb", "flow"} if cotrain else {args.modality}):
        channels = 3 if modality == "rgb" else 2
        out[modality] = torch.randn(b, 2, channels, args.frames, args.crop, args.crop, device=device)
    return out


def sampler_checkpoint(args, directory: Path) -> str:
    """A random encoder of the other modality, saved as stage 2's frozen sampler."""
    from cvtcl.checkpoint import save_checkpoint
    from cvtcl.models import Encoder
    from cvtcl.moco import MomentumContrast

    encoder = Encoder("flow" if args.modality == "rgb" else "rgb", args.backbone)
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "model": MomentumContrast(encoder, 16).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": {}, "complete": True}
    return str(save_checkpoint(directory, state))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(args, dist, spec, sampler="", publish=lambda row: None, label=""):
    """One row: spec = (name, amp, channels_last, batch, legacy, compile, cotrain). `publish`
    receives the row as soon as it is timed, before the profile and the eager comparison (a
    compiled row's comparison may autotune again: a time limit there keeps the timing). `label`
    prefixes its progress lines (`[2/9] fp32`)."""
    name, amp, channels_last, batch_size, legacy, compile_setting, cotrain = spec
    label = label or name
    built = time.perf_counter()
    say(f"{label}: building the model")
    config = make_config(args, amp, channels_last, batch=batch_size, legacy=legacy, compile_setting=compile_setting,
                         sampler=sampler if cotrain else "")
    ctx = build_context(config, dist)
    batch = synthetic_batch(args, dist.device, batch_size, cotrain)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    # stage 2 trains once its queue is full: fill it first, untimed
    fill = config.loss.queue_size // batch_size if cotrain else 0
    try:
        # the captured step (run.compile=graph|step) needs its eager warm-up and the capture before
        # timing; a stage-2 capture made while filling is redone, after its own warm-up, when the queue is full
        warmup = max(args.warmup, graphed.WARMUP_STEPS + 2) if config.run.captures_step else args.warmup
        say(f"{label}: warm-up, " + (f"{fill} steps filling stage 2's queue, then " if fill else "")
            + f"{warmup} untimed step(s)" + (" (the captures among them)" if config.run.captures_step and
                                             dist.device.type == "cuda" else ""))
        terms = [engine.train_step(ctx, batch, 0, 0) for _ in range(fill)]
        start_state = snapshot(ctx) if config.run.captures_step else None  # where the eager comparison starts
        terms += [engine.train_step(ctx, batch, 0, 0) for _ in range(warmup)]
        synchronize(dist.device)
        start = time.perf_counter()
        warmup_s = start - built  # the model, cuDNN's autotune, a compile, the captures, stage 2's filling
        say(f"{label}: timing {args.steps} steps (warm-up took {warmup_s:.1f} s)")
        terms += [engine.train_step(ctx, batch, 0, 0) for _ in range(args.steps)]
        synchronize(dist.device)
        seconds = time.perf_counter() - start
        values = engine.read_terms(terms)
        last = values[-1]
        row = {"variant": name, "amp": amp, "channels_last_3d": channels_last, "batch": batch_size, "legacy_step": legacy,
               "compile": config.run.compile, "graph_scope": config.run.graph_scope, "stage": "cotrain" if cotrain else "instance",
               "samples_per_s": batch_size * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
               "peak_memory_gib": engine.peak_memory_gib(dist.device), "last_loss": last["loss"], "warmup_s": warmup_s}
        publish(dict(row))
        say(f"{label}: {row['samples_per_s']:.2f} samples/s, {row['step_ms']:.0f} ms/step")
        replayed = ctx.graph is not None and bool(ctx.graph.captures)  # run.compile=graph|step on CUDA
        trained = [p.detach().clone() for p in ctx.model.query.parameters()] if replayed else []
        if args.profile and dist.device.type == "cuda":
            try:
                row["profile"] = profile_steps(ctx, batch, dist.device)
            except Exception as err:  # the profiler (CUPTI) failing, say under CUDA graphs: keep the row's timing
                row["profile"] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        if ctx.graph is not None:  # was the step replayed as a CUDA graph, and did it compute what eager does?
            row["cuda_graph"] = {"captures": len(ctx.graph.captures), "error": ctx.graph.error}
        if replayed:
            ctx.graph.release()  # the graphs' memory, before a second model is built
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
            say(f"{label}: the same steps eagerly, to compare with the replay")
            try:
                row["cuda_graph"]["vs_eager"] = compare_with_eager(config, dist, batch, start_state, values[fill:], trained)
            except Exception as err:  # out of memory at batch 64, say: keep the row's timing
                row["cuda_graph"]["vs_eager"] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        return row
    except Exception as err:  # fail soft (out of memory, non-finite loss, a compiler error): keep the other rows
        lines = str(err).strip().splitlines() or [""]
        say(f"{label}: failed ({type(err).__name__}: {lines[0][:200]}); the other rows go on")
        return {"variant": name, "error": f"{type(err).__name__}: {lines[0]}"[:500],
                "traceback_tail": traceback.format_exc()[-1500:]}
    finally:
        del ctx
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()


def snapshot(ctx) -> dict:
    """What the steps from here on depend on: weights, BN statistics, queues, Adam's state, step count."""
    return {"model": copy.deepcopy(ctx.model.state_dict()), "optimizer": copy.deepcopy(ctx.optimizer.state_dict()),
            "step": ctx.step}


def compare_with_eager(config, dist, batch, start: dict, values: list[dict], trained: list[torch.Tensor]) -> dict:
    """The same steps from the same state (`start`: after stage 2's queue filled), eagerly: how far
    the replayed graph's losses and weights (`trained`: the query encoder's after those steps)
    are from the eager step's. Not bitwise on a GPU (cuDNN's algorithms, reduction orders), so
    this reports the differences; a wrong replay (a stale value baked into the graph) shows as a
    difference far above rounding."""
    eager_config = copy.deepcopy(config)
    eager_config.run.compile, eager_config.run.graph_scope = "none", "auto"
    ctx = build_context(eager_config, dist)
    ctx.model.load_state_dict(start["model"])
    ctx.optimizer.load_state_dict(start["optimizer"])
    ctx.step = start["step"]
    eager = engine.read_terms([engine.train_step(ctx, batch, 0, 0) for _ in values])
    loss_diff = max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in zip(values, eager))
    weights = max((a.float() - b.float()).abs().max().item() for a, b in zip(trained, ctx.model.query.parameters()))
    return {"steps": len(values), "max_loss_rel_diff": loss_diff, "max_weight_abs_diff": weights,
            "last_loss": [values[-1]["loss"], eager[-1]["loss"]]}


def profile_steps(ctx, batch, device, steps=3) -> dict:
    """Top-20 CUDA kernels by total time, GPU busy fraction of the wall time and kernels per step."""
    return profile_kernels(lambda: engine.train_step(ctx, batch, 0, 0), steps, lambda: synchronize(device))


def launches_per_step(args) -> dict:
    """Kernel-launching ops, host syncs, FLOPs and eager fp32 memory traffic (step_audit) of one
    ordinary step on the meta device: the new step, the legacy one, the new one with per-call
    graphs as under torchrun (each graph replay counted as one launch; its FLOPs and bytes are not
    counted), and stage 2 (`cotrain`, a random sampler)."""
    from cvtcl import step_audit

    out = {}
    for name, legacy, compile_setting in (("new", False, "none"), ("legacy", True, "none"), ("graphs_per_call", False, "calls"),
                                          ("cotrain", False, "none")):
        cotrain = name == "cotrain"
        # stage 2 with a queue of one batch: full after one step
        step_args = argparse.Namespace(**{**vars(args), "queue": args.batch}) if cotrain else args
        ctx = step_audit.meta_context(make_config(step_args, "fp32", False, legacy=legacy, compile_setting=compile_setting,
                                                  sampler="random" if cotrain else ""))
        if compile_setting == "calls":  # warm-up steps, then the captures; the last step replays
            ctx.graph = graphed.GraphState(step_audit.replay_counting_capture, "calls")
        batch = synthetic_batch(args, torch.device("meta"), cotrain=cotrain)
        # the last step is an ordinary one (stage 2: after the filling step and the first update, which makes Adam's state)
        for step in range(graphed.WARMUP_STEPS + 2 if ctx.graph else 3 if cotrain else 2):
            _, record = step_audit.audit(lambda: engine.train_step(ctx, batch, 0, step))
        out[name] = {"launches": record.launch_count, "syncs": dict(record.syncs),
                     **({"graph_replays": record.launches["graph replay"]} if ctx.graph else
                        {"gflop_per_sample": record.flops / args.batch / 1e9,
                         "eager_fp32_gb_per_sample": record.bytes / args.batch / 1e9})}
    return out


def add_tflops(results: list[dict], counted: dict) -> None:
    """Each timed row's arithmetic rate: FLOPs per sample of its stage (counted on the meta device;
    the same whatever the dtype, layout, batch or graphs) times its samples/s."""
    for row in results:
        entry = counted.get("cotrain" if row.get("stage") == "cotrain" else "new", {})
        if "samples_per_s" in row and "gflop_per_sample" in entry:  # the loader's row: stage 1 too
            row["tflop_per_s"] = entry["gflop_per_sample"] * row["samples_per_s"] / 1000


def variant_specs(args, device) -> list[tuple]:
    """--variants -> (name, amp, channels_last, batch, legacy, compile, cotrain) per row."""
    cuda = device.type == "cuda"
    best = "bf16" if cuda and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    specs = []
    for item in filter(None, args.variants.split(",")):
        name, _, compile_setting = item.partition("+")
        compile_setting = compile_setting or "none"
        if name not in VARIANTS or compile_setting not in COMPILE:
            raise UsageError(f"--variants: unknown {item!r}; names {','.join(VARIANTS)}, compile {','.join(COMPILE[1:])}")
        if name in ("bf16", "fp16") and not cuda:
            continue  # CPU: fp16 autocast is CUDA-only; CPU bf16 conv3d backward is broken (engine.amp_dtype)
        suffix = {"none": "", "calls": " graphs per call"}.get(compile_setting, f" compile={compile_setting}")
        amp = name if name in ("fp32", "bf16", "fp16") else "fp32" if name == "legacy" else best
        label = {"legacy": "legacy fp32 (old eager step)", "channels_last": f"{best} channels_last_3d",
                 "batch64": f"{best} batch {args.big_batch}", "cotrain": f"{best} stage 2 (cotrain)"}.get(name, name)
        specs.append((label + suffix, amp, name == "channels_last", args.big_batch if name == "batch64" else args.batch,
                      name == "legacy", compile_setting, name == "cotrain"))
    return specs


def time_loader(args, dist, amp, root):
    """The real loader feeding the production step: clips/s and the share of time spent waiting for data."""
    from cvtcl.data import build_pretrain_loader

    config = make_config(args, amp, False, root)
    ctx = build_context(config, dist)
    loader = build_pretrain_loader(**loader_arguments(config, dist))
    steps = min(args.warmup + args.steps, loader.steps_per_epoch)  # more than --warmup: check_loader_steps
    waits, started = [], []

    def start_clock():  # the step no longer synchronises: time the window wall to wall
        synchronize(dist.device)
        started.append(time.perf_counter())

    def on_step(epoch, epoch_step, terms, data_s, compute_s):
        waits.append(data_s)
        if len(waits) == args.warmup:
            start_clock()
        return len(waits) >= steps

    if args.warmup == 0:  # the window starts with the first step
        start_clock()
    engine.train_one_epoch(ctx, loader.epoch(0), 0, 0, on_step)
    synchronize(dist.device)
    total = time.perf_counter() - started[0]
    waits = waits[args.warmup :]
    return {"variant": f"loader {args.data_backend} + step ({amp})", "amp": amp, "steps": len(waits),
            "samples_per_s": args.batch * len(waits) / total, "data_wait_fraction": sum(waits) / total}


def main(argv=None) -> int:
    args = parse_args(argv)
    check_device(args.device, auto=True)
    if args.data is not None:
        check_loader_steps(args)
    device = resolve_device(args.device)
    dist = DistInfo(0, 0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    specs = variant_specs(args, device)
    requested = [item for item in args.variants.split(",") if item]
    cuda_only = [item for item in requested if item.partition("+")[0] in ("bf16", "fp16")] if device.type != "cuda" else []
    say(f"{args.backbone} on {device}, batch {args.batch}, {args.frames}x{args.crop}x{args.crop} {args.modality} clips, "
        f"{args.warmup} warm-up + {args.steps} timed steps per row; {len(specs)} rows"
        + (f" ({', '.join(cuda_only)} skipped: CUDA only)" if cuda_only else "")
        + (", then the loader" if args.loader else "") + (", then launches per step" if args.profile else ""))
    record = {
        **header("train_speed", device), "device_type": device.type, "torch": torch.__version__, "backbone": args.backbone,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "batch": args.batch, "frames": args.frames, "crop": args.crop, "modality": args.modality, "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        sampler = sampler_checkpoint(args, Path(tmp) / "sampler") if any(s[-1] for s in specs) else ""
        def write_so_far(timing=None):
            # Written after every variant, and as soon as a row is timed: a time limit leaves what was measured.
            if args.json:
                results = record["results"] + ([timing] if timing else [])
                incomplete = f"incomplete: stopped after {len(results)} variants"
                write_json_atomic(args.json, record | {"results": results, "error": incomplete})

        for i, spec in enumerate(specs, 1):
            label = f"[{i}/{len(specs)}] {spec[0]}"
            record["results"].append(time_variant(args, dist, spec, sampler, publish=write_so_far, label=label))
            write_so_far()
    best = next((s[1] for s in specs if not s[4]), "fp32")
    if args.loader:
        with tempfile.TemporaryDirectory() as tmp:
            say(f"loader: {args.data_backend} on {args.data or 'toy shards'} feeding the step ({best})")
            try:
                # enough toy shards for the timed steps
                root = args.data or write_toy_shards(
                    Path(tmp) / "shards", size=args.gen_size, num_videos=args.batch * (args.steps + args.warmup + 1),
                    frames=args.frames, with_flow=args.modality == "flow")
                row = time_loader(args, dist, best, root)
                say(f"loader: {row['samples_per_s']:.2f} samples/s, waiting for data {row['data_wait_fraction']:.0%} of the time")
            except Exception as err:  # fail soft: keep the synthetic variants, say why the loader failed
                row = {"variant": "loader", "error": f"{type(err).__name__}: {err}"[:2000]}
                say(f"loader: failed ({row['error'][:200]})")
            record["results"].append(row)

    if args.profile:  # after the rows (~15 s of host time for S3D): a time limit stops the run here first
        say("counting launches, syncs and FLOPs per step on the meta device")
        record["launches_per_step"] = launches_per_step(args)
    reference = next((r for r in record["results"] if r.get("legacy_step") and "samples_per_s" in r), None)
    for r in record["results"]:
        if reference and "samples_per_s" in r:
            r["speedup_vs_legacy"] = r["samples_per_s"] / reference["samples_per_s"]
    add_tflops(record["results"], record.get("launches_per_step", {}))
    print_table(record["results"])
    print(json.dumps(record))
    if args.json:
        write_json_atomic(args.json, record)
    return 0


def print_table(results):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training step throughput (one process)")
    for column in ("variant", "samples/s", "x legacy", "TFLOP/s", "step ms", "peak GiB", "data wait"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else r.get("error", "-") if key == "samples_per_s" else "-"

        table.add_row(r["variant"], cell("samples_per_s", ".2f"), cell("speedup_vs_legacy", ".2f"), cell("tflop_per_s", ".1f"),
                      cell("step_ms", ".1f"), cell("peak_memory_gib", ".2f"), cell("data_wait_fraction", ".1%"))
    Console(stderr=True).print(table)


if __name__ == "__main__":
    sys.exit(run_script("train_speed.py", main))
