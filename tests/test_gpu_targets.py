"""benchmarks/gpu_targets.py: a check's JSON files against the performance targets."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_targets  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _row(variant, samples, stage="instance", amp="bf16", compile_setting="graph", batch=16, **extra):
    row = {"variant": variant, "amp": amp, "batch": batch, "legacy_step": variant.startswith("legacy"),
           "compile": compile_setting, "stage": stage, "samples_per_s": samples, "channels_last_3d": False}
    if compile_setting in ("graph", "step"):
        row["cuda_graph"] = {"captures": 1, "error": None, "vs_eager": {"max_loss_rel_diff": 2e-4}}
    return row | extra


def _flow_row(device, cuts, no_cuts=None, speedup=None, epe=0.01, backend="tvl1-torch compiled", **cell):
    def mix(rate):
        return {"pairs_per_s": rate, "speedup_vs_opencv_x1": speedup, "epe_vs_opencv": epe, **cell}
    return {"size": "240x320", "backend": backend, "device": device, "no cuts": mix(no_cuts or 2 * cuts), "cuts": mix(cuts)}


def _write(directory, train=None, compiled=None, flow=None, devices=()):
    """The files of a check run; `devices`: {name: device} where a file names another than an H200."""
    for name, rows in (("train_speed", train), ("train_speed_compiled", compiled), ("flow_speed", flow)):
        if rows is not None:
            device = dict(devices).get(name, "NVIDIA H200")
            (directory / f"{name}.json").write_text(json.dumps({"device": device, "gpu": device, "results": rows}))


def _statuses(directory, capsys):
    assert gpu_targets.main([str(directory), "--json", str(directory / "targets.json")]) == 0
    out = capsys.readouterr().out
    checks = json.loads((directory / "targets.json").read_text())
    return {c["target"]: c["status"] for c in checks["checks"]}, checks, out


def test_a_run_that_meets_every_target(tmp_path, capsys):
    _write(tmp_path,
           train=[_row("legacy fp32 (old eager step)", 110, amp="fp32", compile_setting="none"),
                  _row("bf16 compile=graph", 640), _row("bf16 batch 64 compile=graph", 820, batch=64),
                  _row("bf16 stage 2 (cotrain) compile=graph", 560, stage="cotrain")],
           compiled=[_row("bf16 compile=step", 700, compile_setting="step")],
           flow=[_flow_row("cuda", 260, speedup=560, cuda_graphs={"captured": 30, "error": None}),
                 _flow_row("cuda, 2 processes", 310, speedup=660, pixel_iterations_per_pair=5.3e7,
                           floor_traffic_gb_per_s=1052.0, of_peak_bandwidth=0.314),
                 _flow_row("cpu 1 proc", 0.46, speedup=1.0, epe=0.0, backend="opencv-tvl1")])
    statuses, checks, out = _statuses(tmp_path, capsys)
    bandwidth = next(c for c in checks["checks"] if c["target"].startswith("flow: best GPU row, least traffic"))
    assert bandwidth["status"] == "INFO" and bandwidth["value"] == "31% (1052 GB/s, 53M pixel-iterations a pair)"
    assert statuses["step: stage 1 bf16, best row (samples/s)"] == "PASS"
    assert statuses["step: best stage 1 / legacy fp32"] == "PASS"  # 820 / 110
    assert statuses["flow: best GPU row / one OpenCV process, with cuts"] == "PASS"
    assert "FAIL" not in statuses.values() and "MISSING" not in statuses.values(), out
    assert "none of these files' rows" not in out
    fastest = checks["fastest"]
    assert fastest["stage1"]["batch"] == 64 and fastest["stage1"]["compile"] == "graph"
    assert fastest["flow"]["device"] == "cuda, 2 processes"
    assert fastest["flow_workers_per_gpu"] == {"cuda, 2 processes": pytest.approx(310 / 260)}
    assert "targets on NVIDIA H200" in out


def test_failures_and_missing_rows_are_named(tmp_path, capsys):
    broken = _row("bf16 compile=graph", 300)
    broken["cuda_graph"] = {"captures": 0, "error": "RuntimeError: operation not permitted when stream is capturing"}
    wrong = _row("bf16 channels_last_3d compile=graph", 400)
    wrong["cuda_graph"]["vs_eager"]["max_loss_rel_diff"] = 0.3
    profiled = _row("bf16", 350, compile_setting="none", profile={"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"})
    _write(tmp_path, train=[_row("legacy fp32 (old eager step)", 110, amp="fp32", compile_setting="none"), broken, wrong,
                            {"variant": "bf16 batch 64", "error": "OutOfMemoryError: CUDA out of memory"}, profiled])
    statuses, _, out = _statuses(tmp_path, capsys)
    assert statuses["step: stage 1 bf16, best row (samples/s)"] == "FAIL"  # 400 < 600
    assert statuses["step: stage 2 (cotrain), best row (samples/s)"] == "MISSING"
    assert statuses["graph: bf16 compile=graph"] == "FAIL" and "not permitted" in out
    assert statuses["graph: bf16 channels_last_3d compile=graph vs eager (max loss rel. diff)"] == "FAIL"
    assert statuses["row failed: bf16 batch 64"] == "FAIL"
    assert statuses["profile: bf16"] == "MISSING" and "CUPTI_ERROR" in out  # the profiler failed, the row stands
    assert statuses["flow: best GPU row, with cuts (pairs/s)"] == "MISSING"


def test_a_cpu_smoke_run_reports_graph_rows_as_missing_not_failed(tmp_path, capsys):
    graphed = _row("fp32 compile=graph", 200, amp="fp32")
    graphed["cuda_graph"] = {"captures": 0, "error": None}
    (tmp_path / "train_speed.json").write_text(json.dumps({"device": "x86_64", "device_type": "cpu", "results": [graphed]}))
    statuses, _, out = _statuses(tmp_path, capsys)
    assert statuses["graph: fp32 compile=graph"] == "MISSING" and "CUDA only" in out
    (tmp_path / "train_speed.json").write_text(json.dumps({"device": "NVIDIA H200", "device_type": "cuda", "results": [graphed]}))
    statuses, _, out = _statuses(tmp_path, capsys)
    assert statuses["graph: fp32 compile=graph"] == "FAIL" and "no capture made" in out


def test_a_directory_without_results_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no train_speed.json"):
        gpu_targets.main([str(tmp_path)])
    with pytest.raises(UsageError, match="is not a directory"):
        gpu_targets.main([str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="the folder .*missing does not exist"):  # before reading anything
        gpu_targets.main([str(tmp_path), "--json", str(tmp_path / "missing" / "targets.json")])


def test_files_of_two_devices_are_not_mixed(tmp_path, capsys):
    """The legacy row of one GPU against the compiled row of another is no speed-up: refused,
    naming each file's device (crafted files naming an H100 and an H200 printed PASS)."""
    _write(tmp_path, train=[_row("legacy fp32 (old eager step)", 110, amp="fp32", compile_setting="none")],
           compiled=[_row("bf16 compile=step", 700, compile_setting="step")],
           devices={"train_speed": "NVIDIA H100 80GB HBM3"})
    with pytest.raises(UsageError, match="name different devices \\(train_speed.json: NVIDIA H100 80GB HBM3; "
                                         "train_speed_compiled.json: NVIDIA H200\\)"):
        gpu_targets.main([str(tmp_path)])
    # the same device: the ratio stands, and says that its rows come from two files, not one run
    _write(tmp_path, train=[_row("legacy fp32 (old eager step)", 110, amp="fp32", compile_setting="none")],
           compiled=[_row("bf16 compile=step", 700, compile_setting="step")])
    statuses, _, out = _statuses(tmp_path, capsys)
    assert statuses["step: best stage 1 / legacy fp32 (rows of two files, one device; not one run)"] == "PASS"


def test_a_cpu_only_flow_run_names_its_cpu(tmp_path, capsys):
    """flow_speed.json of a machine without a GPU ("gpu": null) printed 'targets on None'."""
    record = {"gpu": None, "cpu": "AMD EPYC", "results": [_flow_row("cpu 1 proc", 0.46, speedup=1.0, backend="opencv-tvl1")]}
    (tmp_path / "flow_speed.json").write_text(json.dumps(record))
    _, checks, out = _statuses(tmp_path, capsys)
    assert out.startswith("targets on AMD EPYC (") and checks["device"] == "AMD EPYC"
    (tmp_path / "flow_speed.json").write_text(json.dumps(record | {"cpu": None}))
    _, checks, out = _statuses(tmp_path, capsys)
    assert out.startswith("targets on unknown device (")


def test_a_committed_partial_run_is_read_and_said_partial(tmp_path, capsys):
    """The docstring's example: a committed folder whose check timed out holds *.partial.json (exit 1 before)."""
    folder = ROOT / "benchmarks" / "results" / "2026-11-26-h100-80gb-hbm3"
    assert gpu_targets.main([str(folder), "--json", str(tmp_path / "targets.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("targets on NVIDIA H100 80GB HBM3 (")
    assert "a partial run: train_speed.partial.json, flow_speed.partial.json" in out
    assert "none of these files' rows is one the targets read" in out  # its rows predate the targets
    assert json.loads((tmp_path / "targets.json").read_text())["partial"] == ["train_speed.partial.json",
                                                                            "flow_speed.partial.json"]


def test_kernel_summaries_and_the_flow_profile_line(tmp_path, capsys):
    """benchmarks.common.summarize_kernels (the profiler's events of train_speed and flow_speed):
    kernels per repeat, busy fraction, top kernels by total time; gpu_targets shows a flow row's
    profile as INFO."""
    from types import SimpleNamespace

    from benchmarks.common import summarize_kernels

    events = [SimpleNamespace(name=n, device_time=t) for n, t in
              (("triton_red_fused_iteration", 30.0), ("triton_poi_fused_dual", 20.0), ("triton_red_fused_iteration", 30.0))]
    summary = summarize_kernels(events, wall_us=200.0, repeats=2, per="batch")
    assert summary["kernels_per_batch"] == 1.5 and summary["gpu_busy_fraction"] == pytest.approx(0.4)
    assert summary["top_kernels"] == [{"name": "triton_red_fused_iteration", "total_ms": 0.06, "calls": 2},
                                      {"name": "triton_poi_fused_dual", "total_ms": 0.02, "calls": 1}]
    _write(tmp_path, flow=[_flow_row("cuda", 150, profile=summary),
                           _flow_row("cuda", 140, backend="tvl1-torch compiled, no graphs",
                                     profile={"error": "RuntimeError: CUPTI_ERROR_INVALID_DEVICE"})])
    statuses, checks, out = _statuses(tmp_path, capsys)
    line = next(c for c in checks["checks"] if c["target"] == "flow profile: tvl1-torch compiled on cuda")
    assert line["status"] == "INFO" and line["value"].startswith("GPU busy 40%, 2 kernels a batch, top: triton_red")
    assert statuses["flow profile: tvl1-torch compiled, no graphs on cuda"] == "MISSING"
