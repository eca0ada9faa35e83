"""GPU checks of the loader, run by `benchmarks/gpu_check.sh` (one JSON file per check).

    python benchmarks/gpu_loader_check.py parity OUT.json [--device cuda]
    python benchmarks/gpu_loader_check.py decoder-sweep OUT.json [--loads 0,0.25,0.5,0.75,1]

parity: the 'mixed' GPU pipelines against DALI's CPU-only mode on the same synthetic shards and
the same plans: pretraining (rgb + flow, spread segments, colour off and on) and ten-crop
evaluation. nvJPEG (and the hardware decoder) may round differently from libjpeg-turbo, so the
check is a tolerance in 8-bit levels: mean <= 1.5 and max <= 16 (colour off), flow-x sign
flips exact on the GPU as well. decoder-sweep: DALI loader frames/s at each `hw_decoder_load`
(the share of JPEGs sent to the A100/H100 hardware JPEG decoder; the rest go to CUDA nvJPEG):
each load's `wall_s` is loader_speed's timed window, its `call_s` the whole loader_speed run at
that load (pipeline build, warm-up, integrity check). With --device cpu both run in DALI's CPU-only
mode (a smoke run on machines without a GPU). Both name the device and versions in their JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ArgumentParser,
    header,
    json_path,
    parse_size,
    positive_int,
    run_script,
    write_toy_shards,
)
from preprocess.schema import write_json_atomic  # noqa: E402

LEVELS = {"rgb": 0.225 * 255, "flow": 128.0}  # normalised units -> 8-bit levels


def _stats(a: torch.Tensor, b: torch.Tensor, modality: str) -> dict:
    diff = (a.float().cpu() - b.float().cpu()).abs() * LEVELS[modality]
    return {"max_levels": float(diff.max()), "mean_levels": float(diff.mean())}


def parity(args) -> dict:
    from cvtcl.data import build_eval_loader, build_pretrain_loader
    from dali_pipelines.toy_shards import write_toy_dataset

    h, w = (int(v) for v in args.size.split("x"))
    out = {**header("gpu_loader_check", args.device), "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_toy_dataset(Path(tmp), num_videos=6, num_frames=args.frames + 4, height=h, width=w,
                                 num_static=1, quality=90)
        for colour in (False, True):
            kw = dict(batch_size=2, frames_per_clip=args.frames, crop_size=args.crop, num_segments=4,
                      modalities=("rgb", "flow"), segments="spread", pair_mode="coclr", colour=colour,
                      num_workers=0, num_threads=2)  # parity of the ops: no spawned source workers (they slow each build)
            gpu = list(build_pretrain_loader(root, device=args.device, **kw).epoch(0))
            cpu = list(build_pretrain_loader(root, device="cpu", **kw).epoch(0))
            for key in ("rgb", "flow", "rgb_segments", "flow_segments"):
                stats = [_stats(g[key], c[key], key.split("_")[0]) for g, c in zip(gpu, cpu)]
                out["checks"][f"pretrain_{key}_colour_{colour}"] = {
                    "max_levels": max(s["max_levels"] for s in stats),
                    "mean_levels": max(s["mean_levels"] for s in stats),
                    "limit": {"max_levels": 16 if not colour else 32, "mean_levels": 1.5},
                }
        for modality in ("rgb", "flow"):
            kw = dict(modality=modality, frames_per_clip=args.frames, window_stride=args.frames, crop_size=args.crop,
                      crops="ten", batch_size=2, num_workers=0)
            gpu = list(build_eval_loader(root, device=args.device, **kw))
            cpu = list(build_eval_loader(root, device="cpu", **kw))
            stats = [_stats(g[modality], c[modality], modality) for g, c in zip(gpu, cpu)]
            x = gpu[0][modality].float().cpu()
            mirrored = x[:, :5].flip(-1)
            if modality == "flow":
                mirrored[:, :, 0] = -mirrored[:, :, 0]
            out["checks"][f"eval_tencrop_{modality}"] = {
                "max_levels": max(s["max_levels"] for s in stats), "mean_levels": max(s["mean_levels"] for s in stats),
                "limit": {"max_levels": 16, "mean_levels": 1.5},
                "flips_exact_on_device": bool(torch.equal(x[:, 5:], mirrored)),
            }
    for check in out["checks"].values():
        check["ok"] = (check["max_levels"] <= check["limit"]["max_levels"]
                       and check["mean_levels"] <= check["limit"]["mean_levels"]
                       and check.get("flips_exact_on_device", True))
    out["ok"] = all(c["ok"] for c in out["checks"].values())
    return out


def decoder_sweep(args) -> dict:
    import loader_speed  # benchmarks/ is on sys.path when this file runs as a script

    results = []
    with tempfile.TemporaryDirectory() as tmp:  # one dataset for every load
        root = write_toy_shards(Path(tmp), size=args.size, num_videos=args.batch * (args.steps + 2), frames=args.frames)
        for load in (float(v) for v in args.loads.split(",")):
            argv = ["--shards", str(root), "--device", args.device, "--backends", "dali", "--batch", str(args.batch),
                    "--frames", str(args.frames), "--crop", str(args.crop), "--steps", str(args.steps),
                    "--hw-decoder-load", str(load), "--workers", "2", "--threads", "4"]
            t0 = time.perf_counter()
            report = loader_speed.main(argv)
            # the loader's `wall_s` is its timed window; `call_s` the whole run at this load
            results.append({"hw_decoder_load": load, "call_s": time.perf_counter() - t0, **report["results"]["dali"]})
    return {"benchmark": "gpu_loader_check", "device": report["device"], "versions": report["versions"], "sweep": results}


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("parity", "decoder-sweep"))
    parser.add_argument("out", type=json_path, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="240x320", help="HxW of the synthetic frames")
    parser.add_argument("--frames", type=positive_int, default=16)
    parser.add_argument("--crop", type=positive_int, default=112)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--loads", default="0,0.25,0.5,0.75,1")
    args = parser.parse_args(argv)
    parse_size(args.size, "--size")
    started = time.time()
    try:
        result = parity(args) if args.check == "parity" else decoder_sweep(args)
    except Exception as err:  # fail soft: the error is the result, gpu_check.sh goes on
        result = {"error": f"{type(err).__name__}: {err}"[:4000]}
    result.update(check=args.check, seconds=time.time() - started)
    write_json_atomic(args.out, result)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_script("gpu_loader_check.py", main))
