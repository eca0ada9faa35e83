"""Shared fixtures and the suite's process check.

`synthetic_dataset` is a tiny packed dataset made by the real `cvtcl-preprocess synthetic` code
path (generator, UCF101 indexing, packing with TV-L1 flow).

No test may leave a process behind: pytest makes itself a child subreaper (Linux), so a process
orphaned by a test (a trainer's DALI worker after the trainer was killed) is re-parented to pytest
instead of init; at the end of the session every child still running is listed, killed, and the
session fails.
"""

import ctypes
import gc
import os
import signal
import sys
import time

import pytest

from processes import alive, children, command_line, reap_zombies

TINY_SYNTHETIC = [
    "--classes", "3", "--videos-per-class", "4", "--clips-per-group", "2",
    "--frames", "20", "--height", "32", "--width", "40", "--seed", "0",
    "--videos-per-shard", "5", "--workers", "1",
]
PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config):
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _resource_tracker() -> int | None:
    """multiprocessing's resource tracker: a child by design, it ends when pytest does."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def pytest_sessionfinish(session, exitstatus):
    gc.collect()  # loaders still referenced by dead frames close their worker pools
    expected = {_resource_tracker()}
    deadline = time.time() + 10
    while (running := [p for p in children(os.getpid()) if alive(p) and p not in expected]) and time.time() < deadline:
        time.sleep(0.2)
    reap_zombies()
    if running:
        lines = "\n".join(f"  {pid}: {command_line(pid)}" for pid in running)
        print(f"\nFAILED: the tests left {len(running)} process(es) running (killed now):\n{lines}", file=sys.stderr)
        for pid in running:
            os.kill(pid, signal.SIGKILL)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Path of a packed synthetic dataset: 3 classes x 4 videos (2 source groups of 2 clips per
    class; split 1 tests group 1), 20 frames of 32x40 at 25 fps, RGB + TV-L1 flow, 3 shards.
    The raw UCF101-layout tree is under <path>/raw."""
    from preprocess.cli import main

    out = tmp_path_factory.mktemp("synthetic") / "data"
    status = main(["synthetic", "--out", str(out), *TINY_SYNTHETIC])
    assert status == 0, f"cvtcl-preprocess synthetic exited {status}"
    return out
