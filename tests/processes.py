"""Finding processes from /proc: the children of a process, its descendants, whether one still runs.

Used by conftest.py (no test may leave a process behind) and by the kill tests of test_faults.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of `pid`, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running (a zombie has ended: it only waits to be reaped)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[1] == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def reap_zombies() -> None:
    """Reap the ended children of this process (orphans re-parented to it as subreaper)."""
    for child in children(os.getpid()):
        if not alive(child):
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path, pid: str = "4242"):
    """Another process holds the flock of `lock` (as `exclusive_dir` does, recording `pid`) until
    the block ends."""
    code = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.pwrite(fd, (sys.argv[2] + '\\n').encode(), 0)\nprint('held', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock), pid], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")
