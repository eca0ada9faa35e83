"""Every `benchmarks/*.py` runs as a script from the repository root, as the README shows it
(`python benchmarks/x.py`), without the checkout on PYTHONPATH and without its installed copy:
the test's own venv has the project installed in editable mode, which would hide a script that
only imports because of it, so each script runs as `python benchmarks/x.py` would, with the
editable install's import hook removed first."""

import json
import os
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


@pytest.mark.parametrize("script, argv, message", [
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
])
def test_input_errors_are_one_line_and_exit_2(tmp_path, script, argv, message):
    """Input the user can fix (a GPU this machine lacks, a flag out of range, a path that is not a
    dataset) is one line on stderr and exit 2, found before any work, not a traceback and exit 1."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
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
