"""benchmarks/gpu_check.sh runs its steps on a machine without a GPU (DALI CPU-only mode, smoke
size) and writes one JSON file per step, none of them an error."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.multiprocess
def test_gpu_check_runs_cpu_parts(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.stem for p in tmp_path.glob("*.json")}
    assert {"environment", "loader_parity", "hw_decoder_sweep", "loader_speed", "flow_speed", "train_speed",
            "train_speed_compiled", "schedule"} <= names
    for path in tmp_path.glob("*.json"):
        result = json.loads(path.read_text())
        assert "error" not in result, (path.name, result)
    assert json.loads((tmp_path / "loader_parity.json").read_text())["ok"]
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert all(schedule["complete"].values()) and schedule["last_record"]["queue_full"] == 1.0
    train = json.loads((tmp_path / "train_speed.json").read_text())
    assert train["results"][0]["variant"].startswith("legacy") and train["launches_per_step"]["new"]["syncs"] == {}


def test_step_limits_fit_one_device_call():
    """The GPU limits of all steps (the larger where a step has a CPU and a GPU form) add up to at
    most 450 s, so the check and its start fit one device call of 8 minutes."""
    limits: dict[str, int] = {}
    for name, limit in re.findall(r"^\s*step (\w+) (\d+) ", SCRIPT.read_text(), flags=re.MULTILINE):
        limits[name] = max(limits.get(name, 0), int(limit))
    assert {"environment", "schedule", "train_speed", "train_speed_compiled", "flow_speed"} <= set(limits)
    assert sum(limits.values()) <= 450, limits
