"""What ran a training run: one JSON line per launch in `run.out_dir/launches.jsonl`.

A run is often launched several times (preemption, a crash, a longer `optim.epochs`), possibly on
other machines or after an upgrade, and its numbers mean little without knowing on what. Each
launch appends, on rank 0, the time, the command line, where it resumed, the processes and the
device, the precision and compile mode in effect, and the versions of everything that decides
the arithmetic (torch, CUDA, cuDNN, NCCL, DALI, this package and its git commit). The same facts
open the run's output as one line (`summary`). The benchmarks name their device with the same
functions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import cvtcl
from preprocess.hygiene import OutputDirError

LAUNCHES_NAME = "launches.jsonl"


def cpu_name() -> str:
    """The first "model name" of /proc/cpuinfo; `platform.processor()` (may be "") without one."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def device_info(device: torch.device) -> dict[str, Any]:
    """The device's name and, for a GPU, its compute capability and memory."""
    if device.type != "cuda":
        return {"type": device.type, "name": cpu_name() or platform.machine(), "cores": os.cpu_count()}
    properties = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1)}


def git_commit() -> str | None:
    """This package's git commit ("+dirty" when tracked files changed), or None outside a checkout."""
    root = Path(cvtcl.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git on the machine, or a damaged checkout
        return None


def versions() -> dict[str, Any]:
    """Versions that decide the arithmetic; DALI's and OpenCV's only when this process imported them."""
    out: dict[str, Any] = {"cvtcl": cvtcl.__version__, "git": git_commit(), "python": platform.python_version(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        try:
            import torch.cuda.nccl as nccl

            version = nccl.version()
            out["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (ImportError, RuntimeError, AttributeError):  # a build without NCCL: not worth stopping a run
            out["nccl"] = None
    for name, module in (("dali", "nvidia.dali"), ("opencv", "cv2"), ("numpy", "numpy")):
        if module in sys.modules:
            out[name] = getattr(sys.modules[module], "__version__", None)
    return out


def launch_record(*, stage: str, world_size: int, device: torch.device, precision: str, compile_mode: str,
                  batch_size: int, resumed_from: int | None, total_steps: int) -> dict[str, Any]:
    """This launch, as launches.jsonl holds it."""
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv, "host": socket.gethostname(), "stage": stage, "resumed_from_step": resumed_from,
            "total_steps": total_steps, "world_size": world_size, "batch_size": batch_size,
            "precision": precision, "compile": compile_mode, "device": device_info(device), "versions": versions()}


def summary(record: dict[str, Any]) -> str:
    """The launch in one line, for the top of the run's output."""
    device, world = record["device"], record["world_size"]
    on = f"{world} processes on {device['name']} each" if world > 1 else f"1 process on {device['name']}"
    return (f"{record['stage']}: {on}, {record['precision']}, run.compile={record['compile']}, "
            f"batch {record['batch_size']} per process (global {record['batch_size'] * world}), "
            f"{record['total_steps']} steps; torch {record['versions']['torch']}")


def record_launch(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append the launch to run_dir/launches.jsonl (rank 0 calls this)."""
    path = Path(run_dir) / LAUNCHES_NAME
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk: one line (exit 2) naming the file
        raise OutputDirError(f"cannot write {path} ({err.strerror}); free space and rerun the same command") from None
