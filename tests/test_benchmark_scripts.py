"""Every `benchmarks/*.py` runs as a script from the repository root, as the README shows it
(`python benchmarks/x.py`), without the checkout on PYTHONPATH and without its installed copy:
the test's own venv has the project installed in editable mode, which would hide a script that
only imports because of it, so each script runs as `python benchmarks/x.py` would, with the
editable install's import hook removed first."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")

# `python benchmarks/x.py` minus an editable install: sys.path[0] is the script's folder, no hook
# that maps cvtcl/preprocess/dali_pipelines to the checkout, no checkout on sys.path.
AS_A_SCRIPT = """
import runpy, sys
script, root = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [sys.argv[3]] + [p for p in sys.path[1:] if p not in ("", root) and "__editable__" not in p]
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.multiprocess
def test_every_benchmark_script_prints_its_help():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # All at once: each pays a torch import of a few seconds, and they wait on nothing else.
    procs = {p.name: subprocess.Popen([sys.executable, "-c", AS_A_SCRIPT, str(p), str(ROOT), str(p.parent)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = err.strip().splitlines()[-1:] or out[-200:]
    assert len(procs) >= 8 and not failed, failed


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")


INPUT_ERRORS = [
    pytest.param("schedule_check.py", ["--device", "cuda"], "--device cuda: torch", marks=NO_CUDA),
    pytest.param("loader_speed.py", ["--device", "cuda"], "--device cuda: torch", marks=NO_CUDA),
    pytest.param("train_speed.py", ["--device", "cuda"], "--device cuda: torch", marks=NO_CUDA),
    pytest.param("preprocess_speed.py", ["--flow", "tvl1-torch", "--flow-device", "cuda"], "--flow-device cuda: torch",
                 marks=NO_CUDA),
    ("train_speed.py", ["--device", "gpu"], "--device gpu: not a device"),
    ("synthetic_separability.py", ["--classes", "3", "--videos-per-class", "4"], "raise --videos-per-class"),
    ("loader_speed.py", ["--device", "cpu", "--shards", "{tmp}"], "no manifest.json in"),
    ("mining_quality.py", ["--data", "{tmp}", "{tmp}/checkpoint-1.pt"], "no manifest.json in"),
    ("preprocess_speed.py", ["--sizes", "16by20"], "--sizes: sizes are HxW"),
    ("preprocess_speed.py", ["--flow", "tvl1", "--flow-device", "cpu"], "--flow tvl1 takes no --flow-device"),
    ("flow_speed.py", ["--sizes", "16by20"], "--sizes: sizes are HxW"),
    # counts and sizes out of range, a --json whose folder is missing: refused at parsing
    ("train_speed.py", ["--variants", "fp32,foo"], "--variants: unknown 'foo'"),
    ("loader_speed.py", ["--device", "cpu", "--batch", "0"], "argument --batch: a whole number >= 1, got '0'"),
    ("flow_speed.py", ["--cpu-pairs", "0"], "argument --cpu-pairs: a whole number >= 1, got '0'"),
    ("loader_speed.py", ["--hw-decoder-load", "1.5"], "argument --hw-decoder-load: a share between 0 and 1"),
    ("loader_speed.py", ["--step-rate", "-5"], "argument --step-rate: a number above 0, got '-5'"),
    ("preprocess_speed.py", ["--repeats", "0"], "argument --repeats: a whole number >= 1, got '0'"),
    ("preprocess_speed.py", ["--sizes", "64x80,8x8"], "--sizes 64x80,8x8: frames are at least 16 pixels a side"),
    ("preprocess_speed.py", ["--frames", "3"], "--frames must be >= 4"),
    ("preprocess_speed.py", ["--jpeg-quality", "0"], "--jpeg-quality must be 1..100, got 0"),
    ("gpu_targets.py", ["{tmp}", "--json", "{tmp}/missing/targets.json"], "/missing does not exist"),
    ("schedule_check.py", ["--device", "cpu", "--json", "{tmp}/missing/schedule.json"], "/missing does not exist"),
    ("gpu_loader_check.py", ["parity", "{tmp}/missing/parity.json", "--device", "cpu"], "/missing does not exist"),
]


@pytest.fixture(scope="module")
def input_error_runs(tmp_path_factory):
    """Every case of INPUT_ERRORS run at once, a few at a time (each process spends its seconds
    importing torch, on either core): {(script, argv): CompletedProcess}, argv as written above."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("input_errors")

    def run(case):
        script, argv = case[0], [a.format(tmp=tmp) for a in case[1]]
        return subprocess.run([sys.executable, f"benchmarks/{script}", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    cases = [(c.values if hasattr(c, "values") else c)[:2] for c in INPUT_ERRORS]
    with ThreadPoolExecutor(4) as pool:
        return {(script, tuple(argv)): proc for (script, argv), proc in zip(cases, pool.map(run, cases))}


@pytest.mark.parametrize("script, argv, message", INPUT_ERRORS)
def test_input_errors_are_one_line_and_exit_2(input_error_runs, script, argv, message):
    """Input the user can fix (a GPU this machine lacks, a flag out of range, a path that is not a
    dataset) is one line on stderr and exit 2, found before any work, not a traceback and exit 1."""
    proc = input_error_runs[script, tuple(argv)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and message in lines[-1], proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), lines


@NO_CUDA
def test_a_check_that_records_its_error_still_does(tmp_path):
    """gpu_check.sh reads gpu_loader_check's failures from its JSON: --device cuda without a GPU is
    still recorded there (the decoder sweep calls loader_speed's main), exit 0."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_loader_check.py", "decoder-sweep", str(out), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--device cuda: torch" in json.loads(out.read_text())["error"]


def _script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_synthetic_separability_names_only_its_own_flags():
    """Its error told the user to lower --clips-per-group, a flag it did not have."""
    from cvtcl.errors import UsageError

    script = _script("synthetic_separability")
    with pytest.raises(UsageError, match="raise --videos-per-class or lower --clips-per-group") as err:
        script.main(["--classes", "3", "--videos-per-class", "4", "--clips-per-group", "4"])
    help_text = subprocess.run([sys.executable, "benchmarks/synthetic_separability.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120).stdout
    assert all(flag in help_text for flag in re.findall(r"--[a-z-]+", str(err.value)))


def test_schedule_check_prints_one_json_line_naming_device_and_versions(tmp_path, monkeypatch, capsys):
    """It printed a Python dict (not JSON) with "device" as passed (auto) and no versions. The
    schedule itself is stood in for: a run that completed nothing."""
    from benchmarks.common import device_name

    script = _script("schedule_check")
    monkeypatch.setattr(script, "train", lambda argv: 1)
    assert script.main(["--device", "auto", "--json", str(tmp_path / "schedule.json")]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads((tmp_path / "schedule.json").read_text())
    assert line["device"] == device_name("cuda" if torch.cuda.is_available() else "cpu")
    assert line["versions"]["torch"] == torch.__version__ and "error" in line


def test_loader_parity_names_device_and_versions(tmp_path, monkeypatch):
    """parity wrote "device": "cpu" and no versions. Stand-in loaders (equal zeros) replace DALI's."""
    import cvtcl.data
    import dali_pipelines.toy_shards
    from benchmarks.common import device_name

    class Loader:
        def epoch(self, epoch):
            return [{key: torch.zeros(1, 2, 3, 2, 4, 4) for key in ("rgb", "flow", "rgb_segments", "flow_segments")}]

        def __iter__(self):
            return iter([{key: torch.zeros(1, 10, 3, 2, 4, 4) for key in ("rgb", "flow")}])

    monkeypatch.setattr(cvtcl.data, "build_pretrain_loader", lambda *args, **kwargs: Loader())
    monkeypatch.setattr(cvtcl.data, "build_eval_loader", lambda *args, **kwargs: Loader())
    monkeypatch.setattr(dali_pipelines.toy_shards, "write_toy_dataset", lambda root, **kwargs: root)
    out = tmp_path / "parity.json"
    assert _script("gpu_loader_check").main(["parity", str(out), "--device", "cpu"]) == 0
    record = json.loads(out.read_text())
    assert record["ok"] and record["device"] == device_name("cpu") and record["versions"]["torch"] == torch.__version__


def test_decoder_sweep_keeps_the_loaders_window_and_its_own_wall_time(tmp_path, monkeypatch):
    """Each load's wall time of the whole loader_speed run was overwritten by the loader's timed
    window (both were `wall_s`). A stand-in loader_speed reports a window of 0.125 s."""
    import time

    script, loader_speed = _script("gpu_loader_check"), _script("loader_speed")

    def main(argv):
        time.sleep(0.2)
        return {"device": "CPU stand-in", "versions": {}, "results": {"dali": {"frames_per_s": 1.0, "wall_s": 0.125}}}

    monkeypatch.setattr(loader_speed, "main", main)
    monkeypatch.setattr(script, "write_toy_shards", lambda root, **kwargs: root)
    out = tmp_path / "sweep.json"
    assert script.main(["decoder-sweep", str(out), "--device", "cpu", "--loads", "0,1"]) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert [row["wall_s"] for row in sweep] == [0.125, 0.125] and all(row["call_s"] >= 0.2 for row in sweep)
