"""Every `benchmarks/*.py` runs as a script from the repository root, as the README shows it
(`python benchmarks/x.py`), without the checkout on PYTHONPATH."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


@pytest.mark.multiprocess
def test_every_benchmark_script_prints_its_help():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # All at once: each pays a torch import of a few seconds, and they wait on nothing else.
    procs = {p.name: subprocess.Popen([sys.executable, f"benchmarks/{p.name}", "--help"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in SCRIPTS}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = err.strip().splitlines()[-1:] or out[-200:]
    assert len(procs) >= 8 and not failed, failed
