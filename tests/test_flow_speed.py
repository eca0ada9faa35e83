"""benchmarks/flow_speed.py in its smoke form: every CPU row, both mixes, the UCF101 estimate."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_flow_speed_smoke_reports_both_mixes_side_by_side(tmp_path):
    out = tmp_path / "flow_speed.json"
    # 9 pairs: the ninth spans the cut between the first two generated shots
    proc = subprocess.run([sys.executable, "benchmarks/flow_speed.py", "--sizes", "24x32", "--cpu-pairs", "9",
                           "--pool-pairs", "9", "--workers", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert "error" not in record and record["gpu"] is None
    rows = {(r["backend"], r["device"]): r for r in record["results"]}
    assert set(rows) == {("opencv-tvl1", "cpu 1 proc"), ("opencv-tvl1", "cpu pool of 1"),
                         ("tvl1-torch eager", "cpu 1 thread(s)")}
    for row in rows.values():
        assert row["no cuts"]["pairs_per_s"] > 0 and row["cuts"]["pairs_per_s"] > 0
        assert all(row[mix]["epe_vs_opencv"] <= 0.05 for mix in ("no cuts", "cuts"))
        assert row["no cuts"]["epe_truth"] < 0.5
        assert len(row["ucf101_hours"]) == 2 and all(h > 0 for h in row["ucf101_hours"])
    torch_row = rows[("tvl1-torch eager", "cpu 1 thread(s)")]
    assert all(torch_row[mix]["warm_up_s"] > 0 for mix in ("no cuts", "cuts"))
    # the pair across the cut runs every inner iteration: more work per pair with cuts; the GPU's
    # bandwidth figures are for CUDA rows only
    assert torch_row["cuts"]["pixel_iterations_per_pair"] > torch_row["no cuts"]["pixel_iterations_per_pair"] > 0
    assert "of_peak_bandwidth" not in torch_row["cuts"] and "pixel_iterations_per_pair" not in rows[
        ("opencv-tvl1", "cpu 1 proc")]["cuts"]
    assert "UCF101 h" in proc.stdout  # the table


def test_a_failing_run_keeps_the_others(tmp_path, monkeypatch):
    """OpenCV without its contrib modules (a GPU machine's stock OpenCV): its row records the error,
    the tvl1-torch row is still measured (no ratio to OpenCV then), and the record names the failure."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    def no_contrib(gray, first):
        raise RuntimeError("OpenCV was installed without the contrib modules (cv2.optflow is missing)")

    monkeypatch.setattr(flow_speed, "time_opencv", no_contrib)
    out = tmp_path / "flow_speed.json"
    monkeypatch.setattr(sys, "argv", ["flow_speed.py", "--sizes", "24x32", "--cpu-pairs", "3", "--skip", "pool",
                                      "--workers", "1", "--json", str(out)])
    flow_speed.main()
    record = json.loads(out.read_text())
    rows = {r["backend"]: r for r in record["results"]}
    assert rows["opencv-tvl1"]["error"].startswith("RuntimeError: OpenCV was installed without the contrib")
    assert rows["tvl1-torch eager"]["cuts"]["pairs_per_s"] > 0 and "epe_vs_opencv" not in rows["tvl1-torch eager"]["cuts"]
    assert record["error"] == "1 of 2 runs failed: opencv-tvl1 on cpu 1 proc (see their rows)"


@pytest.mark.parametrize("argv, message", [
    (["--cpu-pairs", "0"], "argument --cpu-pairs: a whole number >= 1, got '0'"),
    (["--cpu-pairs", "-2"], "argument --cpu-pairs: a whole number >= 1, got '-2'"),
    (["--workers", "0"], "argument --workers: a whole number >= 1"),
    (["--gpu-processes", "2,0"], "argument --gpu-processes: a whole number >= 1, got '0'"),
    (["--gpu-processes", "two"], "argument --gpu-processes: a whole number >= 1, got 'two'"),
    (["--json", "{tmp}/missing/flow_speed.json"], "the folder {tmp}/missing does not exist"),
])
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, argv, message):
    """A traceback, or an error row and exit 0 after the timing, before; a usage error (exit 2) now."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    from cvtcl.errors import UsageError

    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(UsageError, match=message.format(tmp=tmp_path)):
        flow_speed.main(["--sizes", "24x32", *argv])


def test_rows_that_judge_the_targets_run_first():
    """A time limit (gpu_check.sh's) stops the run after some rows: the default fast path and one
    OpenCV process, which every ratio and EPE against OpenCV needs, come before the others."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    args = flow_speed.parse_args(["--sizes", "240x320", "--cpu-pairs", "9", "--gpu-pairs", "256", "--compile", "cuda",
                                  "--skip", "pool,torch-cpu,eager-cuda", "--gpu-processes", "2"])
    order = [(backend, where) for backend, where, *_ in flow_speed.plan_runs(args, cuda=True)]
    assert order == [("tvl1-torch compiled", "cuda"), ("opencv-tvl1", "cpu 1 proc"),
                     ("tvl1-torch compiled, no graphs", "cuda"), ("tvl1-torch compiled", "cuda, 2 processes")]
    cpu = [(backend, where) for backend, where, *_ in flow_speed.plan_runs(flow_speed.parse_args([]), cuda=False)]
    assert cpu[0] == ("opencv-tvl1", "cpu 1 proc")


def test_a_gpu_process_that_fails_its_warm_up_releases_the_others(monkeypatch):
    """--gpu-processes: the processes meet at a barrier before timing; one that fails before it
    (out of memory, a compile error) aborts the barrier, so the others raise instead of waiting
    until the check's time limit. Threads stand in for the spawned processes."""
    import threading

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    made = []

    def make_backend(*args, **kwargs):
        made.append(1)
        if len(made) == 1:
            raise RuntimeError("CUDA out of memory")
        return object()

    monkeypatch.setattr(flow_speed, "make_backend", make_backend)
    monkeypatch.setattr(flow_speed, "warm_up", lambda backend, gray, first: None)
    monkeypatch.setattr(flow_speed, "_barrier", threading.Barrier(2))
    outcomes = []

    def worker():
        try:
            flow_speed._gpu_process((None, None, 8))
        except BaseException as err:  # noqa: BLE001 (what each process raised is the check)
            outcomes.append(type(err).__name__)

    first = threading.Thread(target=worker, daemon=True)
    first.start()
    first.join(timeout=30)
    second = threading.Thread(target=worker, daemon=True)
    second.start()
    second.join(timeout=30)
    released = not second.is_alive()
    flow_speed._barrier.abort()  # a hung thread (the defect) is freed before the assertion
    assert released and outcomes == ["RuntimeError", "BrokenBarrierError"]


def test_gpu_rows_skipped_without_cuda_are_named_with_the_reason(tmp_path, monkeypatch, capsys):
    """The README's GPU command on a machine without CUDA exited 0 with the OpenCV row only and
    nothing saying why: a note names the skipped rows and the reason, and the record keeps it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    monkeypatch.setattr(flow_speed.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "flow_speed.json"
    flow_speed.main(["--sizes", "24x32", "--cpu-pairs", "3", "--gpu-pairs", "256", "--skip", "pool,torch-cpu",
                     "--gpu-processes", "2", "--json", str(out)])
    record = json.loads(out.read_text())
    assert [(r["backend"], r["device"]) for r in record["results"]] == [("opencv-tvl1", "cpu 1 proc")]
    assert "sees no CUDA device" in record["skipped"]["reason"]
    assert record["skipped"]["rows"] == ["tvl1-torch compiled on cuda", "tvl1-torch compiled, no graphs on cuda",
                                         "tvl1-torch eager on cuda", "tvl1-torch compiled on cuda, 2 processes"]
    captured = capsys.readouterr()
    note = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "4 GPU row(s) skipped" in note[0] and "sees no CUDA device" in note[0], captured.err
    assert json.loads(captured.out.strip().splitlines()[-1]) == record  # the JSON line stays last on stdout
    # with nothing asked of a GPU there is nothing to say
    flow_speed.main(["--sizes", "24x32", "--cpu-pairs", "3", "--skip", "pool,torch-cpu,eager-cuda", "--compile", "none",
                     "--json", str(out)])
    assert "skipped" not in json.loads(out.read_text()) and "note: " not in capsys.readouterr().err


def test_gpu_work_is_set_against_the_peak_bandwidth(monkeypatch):
    """On a GPU a row's pixel-iterations become the least traffic they need per second, and its
    share of the device's peak bandwidth (from the memory clock and bus width)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed
    import torch

    import benchmarks.common as common

    class Props:  # an H100 SXM's: 2619 MHz, 5120 bits
        memory_clock_rate, memory_bus_width = 2_619_000, 5120

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    assert common.peak_memory_bandwidth() == pytest.approx(3.35232e12)
    info = flow_speed.work_info(pixel_iterations=10 * 5_000_000, pairs=10, seconds=0.5, cuda=True)
    assert info["pixel_iterations_per_pair"] == 5_000_000
    assert info["floor_traffic_gb_per_s"] == pytest.approx(50e6 * 64 / 0.5 / 1e9)
    assert info["of_peak_bandwidth"] == pytest.approx(6.4e9 / 3.35232e12)
    assert set(flow_speed.work_info(10, 2, 1.0, cuda=False)) == {"pixel_iterations_per_pair"}


def test_profiles_run_once_every_row_is_written(tmp_path, monkeypatch):
    """--profile: a profiler that crashes (CUPTI under CUDA graphs) must not take the timings with
    it, so each row's profiles run after the last row is written; a row that failed in its second
    mix is not profiled. Stand-in runs replace the backends."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    out = tmp_path / "flow_speed.json"
    profiled = []

    def profile(name, mix):
        def run():
            written = json.loads(out.read_text())["results"]
            profiled.append((name, mix, [r["backend"] for r in written]))
            return {"gpu_busy_fraction": 0.5, "kernels_per_batch": 7.0, "top_kernels": []}
        return run

    def stand_in(name, fail_in=None):
        def run(gray, first):
            mix = "cuts" if len(first) == len(gray) - 1 else "no cuts"
            if mix == fail_in:
                raise RuntimeError("CUDA out of memory")
            return 1.0, np.zeros((len(first), *gray.shape[1:], 2), np.float32), {"profile_later": profile(name, mix)}
        return run

    monkeypatch.setattr(flow_speed, "plan_runs", lambda args, cuda: [
        ("fast", "stand-in", 9, stand_in("fast")), ("failing", "stand-in", 9, stand_in("failing", fail_in="cuts")),
        ("last", "cpu 1 proc", 9, stand_in("last"))])
    flow_speed.main(["--sizes", "24x32", "--profile", "--json", str(out)])
    every = ["fast", "failing", "last"]
    assert profiled == [("fast", "no cuts", every), ("fast", "cuts", every), ("last", "no cuts", every),
                        ("last", "cuts", every)]
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["fast"]["cuts"]["profile"]["kernels_per_batch"] == 7.0 and "error" in rows["failing"]
    assert "profile_later" not in rows["fast"]["no cuts"]


def test_gpu_processes_compile_as_packing_flow_workers_do(monkeypatch):
    """--gpu-processes k: each spawned process gets its share of the cores for inductor's compile
    processes, as packing's flow workers do (the row measures packing's setting)."""
    import os
    import threading

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flow_speed

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(flow_speed, "_barrier", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    flow_speed._gpu_init(threading.Barrier(1), 2)
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
