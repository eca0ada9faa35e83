"""What a `benchmarks/gpu_check.sh` run measured against the performance targets, in one table.

Reads the JSON files a check wrote (train_speed.json, train_speed_compiled.json, flow_speed.json)
and prints, for each target of the training step and of flow extraction, the measured value, the
target and PASS / FAIL / MISSING (MISSING: the check did not reach that row), then the fastest
configurations, which set the defaults (`model.channels_last_3d`, `run.compile`, the batch, flow
workers per GPU). Ratios are taken on one device: files that name different devices are refused,
and a ratio of rows from two files (train_speed.json's legacy row, train_speed_compiled.json's
compiled one) says so. A run that stopped early left `NAME.partial.json` files (a committed
run's name for them): read when `NAME.json` is missing, and said.

    python benchmarks/gpu_targets.py benchmarks/results/<date>-<device>          # a committed run
    python benchmarks/gpu_targets.py OUTDIR --json targets.json                  # also as JSON
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import ArgumentParser, json_path, run_script  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402

STEP_SAMPLES = 600  # stage-1 samples/s, bf16, S3D 32x128x128 (issue: a sync-free, graph-ready step)
STEP_VS_LEGACY = 5.0  # x the old eager fp32 step of the same run
COTRAIN_SAMPLES = 500  # stage 2
GRAPH_LOSS_REL = 1e-2  # a replay this far from the eager step is wrong, not rounding
FLOW_PAIRS = 200  # pairs/s at 240x320 with scene cuts, one GPU
FLOW_VS_OPENCV = 30.0  # x one OpenCV process of the same run
FLOW_EPE = 0.05  # px against OpenCV


@dataclass
class Check:
    target: str
    value: str
    goal: str
    status: str  # PASS, FAIL, MISSING, INFO


def _load(directory: Path, name: str) -> tuple[dict | None, str | None]:
    """-> (the record, its file name): NAME.json, else NAME.partial.json, else (None, None)."""
    for file in (f"{name}.json", f"{name}.partial.json"):
        path = directory / file
        if path.is_file():
            try:
                return json.loads(path.read_text()), file
            except json.JSONDecodeError as err:
                raise UsageError(f"{path} is not JSON ({err}); the check may have stopped while writing it") from None
    return None, None


def _device(record: dict) -> str | None:
    """The device a file names: every script's "device"; an older flow_speed.json's GPU, else its CPU."""
    return record.get("device") or record.get("gpu") or record.get("cpu")


def one_device(directory: Path, records: dict[str, dict]) -> str:
    """The one device the files (by name) were measured on; files naming different ones are refused:
    a ratio of rows from two devices would claim what neither measured."""
    named = {file: _device(record) for file, record in records.items() if _device(record)}
    if len(set(named.values())) > 1:
        raise UsageError(f"{directory}: the files name different devices ({'; '.join(f'{f}: {d}' for f, d in named.items())}); "
                         "targets are judged on one device: give the folder of one gpu_check.sh run")
    return next(iter(named.values()), "unknown device")


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "samples_per_s" in r]


def _compare(target: str, value: float | None, goal: float, unit: str = "", fmt: str = ".1f", at_most=False) -> Check:
    sign = "<=" if at_most else ">="
    if value is None:
        return Check(target, "-", f"{sign} {goal:{fmt}}{unit}", "MISSING")
    ok = value <= goal if at_most else value >= goal
    return Check(target, f"{value:{fmt}}{unit}", f"{sign} {goal:{fmt}}{unit}", "PASS" if ok else "FAIL")


def step_checks(train: dict | None, compiled: dict | None) -> tuple[list[Check], dict]:
    rows = _measured((train or {}).get("results", []) + (compiled or {}).get("results", []))
    legacy = next((r for r in rows if r.get("legacy_step")), None)
    stage1 = [r for r in rows if r.get("stage") == "instance" and not r.get("legacy_step") and r.get("amp") == "bf16"]
    stage2 = [r for r in rows if r.get("stage") == "cotrain"]
    best1 = max(stage1, key=lambda r: r["samples_per_s"], default=None)
    best2 = max(stage2, key=lambda r: r["samples_per_s"], default=None)
    at_16 = max((r for r in stage1 if r.get("batch") == 16), key=lambda r: r["samples_per_s"], default=None)
    in_train = [id(r) for r in (train or {}).get("results", [])]
    # one_device has checked the two files name one device; still not one run, side by side
    two_files = bool(best1 and legacy) and (id(best1) in in_train) != (id(legacy) in in_train)
    checks = [
        _compare("step: stage 1 bf16, best row (samples/s)", best1 and best1["samples_per_s"], STEP_SAMPLES),
        _compare("step: stage 1 bf16 at batch 16 (samples/s)", at_16 and at_16["samples_per_s"], STEP_SAMPLES),
        _compare("step: best stage 1 / legacy fp32" + (" (rows of two files, one device; not one run)" if two_files else ""),
                 best1 and legacy and best1["samples_per_s"] / legacy["samples_per_s"], STEP_VS_LEGACY, "x", ".2f"),
        _compare("step: stage 2 (cotrain), best row (samples/s)", best2 and best2["samples_per_s"], COTRAIN_SAMPLES),
    ]
    on_cpu = (train or {}).get("device_type") == "cpu"  # the script's CPU smoke run: graphs are CUDA-only
    for r in rows:
        graph = r.get("cuda_graph")
        if r.get("compile") in ("graph", "step"):
            if not graph or not graph.get("captures"):
                error = (graph or {}).get("error") or ("CUDA only" if on_cpu else "no capture made")
                checks.append(Check(f"graph: {r['variant']}", error[:80], "captured", "MISSING" if on_cpu else "FAIL"))
                continue
            diff = graph.get("vs_eager", {}).get("max_loss_rel_diff")
            checks.append(_compare(f"graph: {r['variant']} vs eager (max loss rel. diff)", diff, GRAPH_LOSS_REL,
                                   fmt=".1e", at_most=True))
    for r in rows:
        profile = r.get("profile")
        if profile and "error" in profile:  # the profiler failed; the row's timing stands
            checks.append(Check(f"profile: {r['variant']}", profile["error"][:80], "busy near 100%", "MISSING"))
        elif profile:
            checks.append(Check(f"profile: {r['variant']}", f"GPU busy {profile['gpu_busy_fraction']:.0%}, "
                                f"{profile['kernels_per_step']:.0f} kernels/step", "busy near 100%", "INFO"))
    for r in (train or {}).get("results", []) + (compiled or {}).get("results", []):
        if "error" in r and "samples_per_s" not in r:
            checks.append(Check(f"row failed: {r.get('variant', '?')}", r["error"][:80], "-", "FAIL"))
    best = {}
    if best1:
        best["stage1"] = {k: best1.get(k) for k in ("variant", "batch", "compile", "graph_scope", "channels_last_3d",
                                                    "samples_per_s", "tflop_per_s")}
    if best2:
        best["stage2"] = {k: best2.get(k) for k in ("variant", "batch", "compile", "samples_per_s", "tflop_per_s")}
    return checks, best


def flow_checks(flow: dict | None) -> tuple[list[Check], dict]:
    rows = [r for r in (flow or {}).get("results", []) if "cuts" in r]
    gpu = [r for r in rows if str(r.get("device", "")).startswith("cuda")]
    best = max(gpu, key=lambda r: r["cuts"]["pairs_per_s"], default=None)
    cut = best["cuts"] if best else {}
    checks = [
        _compare("flow: best GPU row, with cuts (pairs/s)", cut.get("pairs_per_s"), FLOW_PAIRS),
        _compare("flow: best GPU row / one OpenCV process, with cuts", cut.get("speedup_vs_opencv_x1"),
                 FLOW_VS_OPENCV, "x"),
        _compare("flow: best GPU row, EPE vs OpenCV (px)", best and best["no cuts"].get("epe_vs_opencv"), FLOW_EPE,
                 fmt=".4f", at_most=True),
    ]
    if "of_peak_bandwidth" in cut:  # how far the time is from the bytes the iterations must move
        checks.append(Check("flow: best GPU row, least traffic of its iterations / peak bandwidth",
                            f"{cut['of_peak_bandwidth']:.0%} ({cut['floor_traffic_gb_per_s']:.0f} GB/s, "
                            f"{cut['pixel_iterations_per_pair'] / 1e6:.0f}M pixel-iterations a pair)",
                            "near 100%: bound by bytes", "INFO"))
    for r in gpu:
        profile = r["cuts"].get("profile")
        if profile and "error" in profile:
            checks.append(Check(f"flow profile: {r['backend']} on {r['device']}", profile["error"][:80],
                                "busy near 100%", "MISSING"))
        elif profile:
            checks.append(Check(f"flow profile: {r['backend']} on {r['device']}",
                                f"GPU busy {profile['gpu_busy_fraction']:.0%}, {profile['kernels_per_batch']:.0f} "
                                f"kernels a batch, top: {profile['top_kernels'][0]['name'][:40] if profile['top_kernels'] else '-'}",
                                "busy near 100%", "INFO"))
    for r in gpu:
        graphs = r["cuts"].get("cuda_graphs")
        if graphs is not None:
            status = "FAIL" if graphs.get("error") else "INFO"
            checks.append(Check(f"flow graphs: {r['backend']} on {r['device']}",
                                graphs.get("error") or f"{graphs.get('captured')} captured", "no error", status))
    for r in (flow or {}).get("results", []):
        if "error" in r:
            checks.append(Check(f"row failed: {r['backend']} on {r['device']}", r["error"][:80], "-", "FAIL"))
    chosen = {}
    if best:
        chosen["flow"] = {"backend": best["backend"], "device": best["device"],
                          "pairs_per_s": [best["no cuts"]["pairs_per_s"], best["cuts"]["pairs_per_s"]]}
        one = next((r for r in gpu if r["device"] == "cuda" and r["backend"] == "tvl1-torch compiled"), None)
        many = [r for r in gpu if r["device"].endswith("processes")]
        if one and many:
            chosen["flow_workers_per_gpu"] = {r["device"]: r["cuts"]["pairs_per_s"] / one["cuts"]["pairs_per_s"]
                                              for r in many}
    return checks, chosen


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="where gpu_check.sh wrote its JSON files")
    parser.add_argument("--json", type=json_path, default=None, help="also write the checks here")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        raise UsageError(f"{args.directory} is not a directory (give the OUTDIR of gpu_check.sh)")
    loaded = [_load(args.directory, n) for n in ("train_speed", "train_speed_compiled", "flow_speed")]
    (train, _), (compiled, _), (flow, _) = loaded
    records = {file: record for record, file in loaded if record is not None}
    if not records:
        raise UsageError(f"no train_speed.json, train_speed_compiled.json or flow_speed.json in {args.directory}")
    device = one_device(args.directory, records)
    partial = [file for file in records if file.endswith(".partial.json")]
    step, best_step = step_checks(train, compiled)
    flows, best_flow = flow_checks(flow)
    checks = step + flows
    width = max(len(c.target) for c in checks)
    print(f"targets on {device} ({args.directory})")
    if partial:
        print(f"  a partial run: {', '.join(partial)} (the check stopped before their end; what it reached is below)")
    if all(c.status == "MISSING" for c in checks):
        print("  none of these files' rows is one the targets read: the run stopped before its first, or an "
              "older gpu_check.sh wrote it")
    for c in checks:
        print(f"  {c.status:7} {c.target:{width}}  {c.value:>12}  (target {c.goal})")
    print("fastest:", json.dumps(best_step | best_flow))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "partial": partial, "checks": [asdict(c) for c in checks],
                                         "fastest": best_step | best_flow}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_script("gpu_targets.py", main))
