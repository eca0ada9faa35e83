"""Every `benchmarks/*.py` runs as a script from the repository root, as the README shows it
(`python benchmarks/x.py`), without the checkout on PYTHONPATH and without its installed copy:
the test's own venv has the project installed in editable mode, which would hide a script that
only imports because of it, so each script runs as `python benchmarks/x.py` would, with the
editable install's import hook removed first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
