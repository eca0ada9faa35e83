"""benchmarks/gpu_check.sh runs its steps on a machine without a GPU (DALI CPU-only mode, smoke
size) and writes one JSON file per step, none of them an error."""

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(SCRIPT.parent))


BLOCK_DALI = """import sys


class BlockDali:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] == ["nvidia", "dali"]:
            raise ImportError("DALI blocked by the test")


sys.meta_path.insert(0, BlockDali())
"""


@pytest.fixture(scope="module")
def cpu_checks(tmp_path_factory):
    """The two CPU rehearsals, run side by side (their steps are single-threaded; together they take
    the time of the longer): the `all` profile, and `perf` where `import nvidia.dali` fails.
    {profile: (CompletedProcess, its OUTDIR)}."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(BLOCK_DALI)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    runs = {
        "all": (tmp / "all", ["all"], env),
        "perf": (tmp / "perf", ["perf"], {**env, "PYTHONPATH": str(tmp / "block")}),
    }
    procs = {name: subprocess.Popen(["bash", str(SCRIPT), str(out), *argv], env=run_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (out, argv, run_env) in runs.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), runs[name][0])
    return done


@pytest.mark.multiprocess
def test_gpu_check_runs_cpu_parts(cpu_checks):
    proc, tmp_path = cpu_checks["all"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.stem for p in tmp_path.glob("*.json")}
    assert {"environment", "loader_parity", "hw_decoder_sweep", "loader_speed", "flow_speed", "train_speed",
            "train_speed_compiled", "schedule"} <= names
    for path in tmp_path.glob("*.json"):
        result = json.loads(path.read_text())
        assert "error" not in result, (path.name, result)
    assert json.loads((tmp_path / "loader_parity.json").read_text())["ok"]
    assert json.loads((tmp_path / "environment.json").read_text())["opencv_contrib"] is True  # the suite's OpenCV
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert all(schedule["complete"].values()) and schedule["last_record"]["queue_full"] == 1.0
    train = json.loads((tmp_path / "train_speed.json").read_text())
    assert train["results"][0]["variant"].startswith("legacy") and train["launches_per_step"]["new"]["syncs"] == {}


def _dry_run_output(tmp_path, profile, device="cuda") -> str:
    """GPU_CHECK_DRY_RUN: the steps of a profile, their limits and commands, in order, nothing run."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_DEVICE": device}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path), profile], env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def _dry_run(tmp_path, profile, device="cuda") -> dict[str, int]:
    """The steps of a profile and their limits."""
    output = _dry_run_output(tmp_path, profile, device)
    return {name: int(limit) for name, limit in re.findall(r"^== (\w+) \(limit (\d+)s\)$", output, re.MULTILINE)}


class _Parsed(Exception):
    """Raised in place of running a script once its arguments parsed."""


@pytest.mark.parametrize("profile", ["all", "perf"])
def test_every_gpu_command_parses(tmp_path, profile, monkeypatch):
    """The commands the check runs on a GPU, which no CPU run executes, are valid: arguments that
    parse, train_speed's variants, flow_speed's runs. A typo there would cost a GPU session's row."""
    commands = [shlex.split(line)[1:] for line in _dry_run_output(tmp_path, profile).splitlines()
                if line.startswith("   python benchmarks/")]
    assert {Path(c[0]).stem for c in commands} >= {"train_speed", "flow_speed"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100/H200
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    for script, *argv in commands:
        module = importlib.import_module(Path(script).stem)
        if module.__name__ == "train_speed":
            variants = argv[argv.index("--variants") + 1].split(",")
            specs = module.variant_specs(module.parse_args(argv), torch.device("cuda"))
            assert len(specs) == len(variants), (argv, specs)  # none dropped as CPU-only
        elif module.__name__ == "flow_speed":
            runs = {(backend, where) for backend, where, *_ in module.plan_runs(module.parse_args(argv), cuda=True)}
            assert {("tvl1-torch compiled", "cuda"), ("tvl1-torch compiled, no graphs", "cuda"),
                    ("opencv-tvl1", "cpu 1 proc")} <= runs, runs
        else:
            with monkeypatch.context() as patch, pytest.raises(_Parsed):
                patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                module.main(argv)


def test_step_limits_fit_one_device_call(tmp_path):
    """The GPU limits of each profile's steps add up to at most 450 s, so the check and its start
    fit one device call of 8 minutes; `perf` is the training step and flow only."""
    full, perf = _dry_run(tmp_path, "all"), _dry_run(tmp_path, "perf")
    assert {"environment", "loader_parity", "schedule", "train_speed", "train_speed_compiled", "flow_speed"} <= set(full)
    assert list(perf) == ["environment", "train_speed", "flow_speed", "train_speed_compiled"]
    assert list(full)[-1] == "train_speed_compiled"  # last in both: it gets what the others leave
    assert sum(full.values()) <= 450 and sum(perf.values()) <= 450, (full, perf)
    assert perf["train_speed"] > full["train_speed"] and perf["flow_speed"] > full["flow_speed"]
    assert _dry_run(tmp_path, "perf", "cpu")["train_speed"] == 3 * full["train_speed"]  # the CPU smoke gets 3x


def test_unknown_profile_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "profile must be all or perf, got 'fast'" in proc.stderr


@pytest.mark.multiprocess
def test_perf_profile_needs_no_dali(cpu_checks):
    """The perf profile's steps run where `import nvidia.dali` fails (a GPU machine without the
    DALI wheel staged): environment records dali None without an error, the others their rows."""
    proc, out = cpu_checks["perf"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.stem for p in out.glob("*.json")) == ["environment", "flow_speed", "targets", "train_speed",
                                                          "train_speed_compiled"]
    assert "MISSING step: stage 1 bf16" in proc.stdout  # the targets table (no bf16 row on a CPU)
    # the last step's limit: what the others left of the 450 s (x3 on the CPU), not its nominal 10 (x3)
    left = int(re.search(r"^== train_speed_compiled \(limit (\d+)s\)$", proc.stdout, re.MULTILINE).group(1))
    assert 3 * 10 < left <= 3 * 450, proc.stdout
    environment = json.loads((out / "environment.json").read_text())
    assert environment["dali"] is None and "error" not in environment
    for name in ("train_speed", "flow_speed"):
        assert "error" not in json.loads((out / f"{name}.json").read_text()), name
    rows = json.loads((out / "train_speed.json").read_text())["results"]
    assert all(r.get("samples_per_s", 0) > 0 for r in rows), rows


def _fake_opencv_wheel(folder: Path) -> Path:
    """A wheel whose `cv2` says it has contrib, made by hand: pip takes it from a local folder."""
    wheel = folder / "fake_opencv-1.0-py3-none-any.whl"
    info = "fake_opencv-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("cv2/__init__.py", "__version__ = '0.0-test'\noptflow = None  # what contrib adds\n")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-opencv\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.mark.multiprocess
def test_extras_carried_in_go_first_on_the_path(tmp_path):
    """pack_extras.py packs wheels for a machine without a registry; GPU_CHECK_EXTRAS unpacks them
    before the steps, ahead of what the machine has, and removes them at the end."""
    (tmp_path / "wheels").mkdir()
    _fake_opencv_wheel(tmp_path / "wheels")
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheels")}
    pack = [sys.executable, str(SCRIPT.parent / "pack_extras.py")]
    tarball = tmp_path / "carry" / "extras.tar.xz"
    done = subprocess.run(pack + [str(tarball), "fake-opencv==1.0"], env=pip_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and tarball.is_file(), done.stderr
    assert not list(tarball.parent.glob("*.partial"))

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_DEVICE": "cuda", "PYTHON": sys.executable,
           "TMPDIR": str(scratch), "GPU_CHECK_EXTRAS": os.path.relpath(tarball)}  # relative to where it is called
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "perf"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f"== extras from {tarball}: OpenCV 0.0-test with contrib" in out, out
    assert "== flow_speed" in out and not list(scratch.iterdir())  # the steps listed, the unpacked copy removed

    (tmp_path / "not.tar.xz").write_bytes(b"not a tarball")
    bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "perf"], capture_output=True, text=True,
                         env={**env, "GPU_CHECK_EXTRAS": str(tmp_path / "not.tar.xz")}, timeout=60)
    assert bad.returncode == 2 and "is not a tarball of site/" in bad.stderr and not list(scratch.iterdir())
    absent = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "perf"], capture_output=True, text=True,
                            env={**env, "GPU_CHECK_EXTRAS": str(tmp_path / "absent.tar.xz")}, timeout=60)
    assert absent.returncode == 2 and "absent.tar.xz does not exist" in absent.stderr

    too_big = subprocess.run(pack + [str(tmp_path / "big.tar.xz"), "fake-opencv==1.0", "--max-mib", "0"], env=pip_env,
                             capture_output=True, text=True, timeout=120)
    assert too_big.returncode != 0 and "over --max-mib 0" in too_big.stderr and not (tmp_path / "big.tar.xz").exists()
    missing = subprocess.run(pack + [str(tmp_path / "none.tar.xz"), "no-such-package==1.0"], env=pip_env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "pip could not download no-such-package==1.0 for Python 3.12" in missing.stderr
