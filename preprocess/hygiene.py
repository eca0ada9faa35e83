"""Process hygiene: one writer per output directory, and no child process outliving its parent.

`exclusive_dir(path, what)` holds an `fcntl.flock` on `path/.lock` for the duration of a run
(`cvtcl-preprocess --out`, `cvtcl.train run.out_dir`). flock belongs to the open file, so the
kernel drops it when the holder exits however it exits (SIGKILL included): a lock left by a dead
process is not a lock, and nothing is left to clean up (the holder's pid, written in the file
for the message, is erased on release). A second run gets `DirectoryBusyError`
naming the holder's pid; the CLIs turn it into one line and exit 2. Nested use in one process
(the schedule's directory, then `pack` inside the `synthetic` command) is re-entrant.

`die_with_parent()` asks the kernel to SIGKILL the calling process when its parent dies
(Linux `PR_SET_PDEATHSIG`). DALI's parallel external source starts its workers itself, without an
initialiser hook: forked workers get it from an `os.register_at_fork` hook
(`kill_forked_children_with_parent`), spawned ones when they unpickle the shard reader
(`ShardReader.__setstate__`). Without it a SIGKILLed trainer left its workers (~0.45 GB each,
deaf to SIGTERM) running until reboot. Elsewhere (macOS) both are no-ops. torchrun's rank
processes are not covered: the agent starts them, and whether from a thread that outlives them
is its business (PR_SET_PDEATHSIG fires when the forking thread ends).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import multiprocessing
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"
_PR_SET_PDEATHSIG = 1
_held: dict[Path, int] = {}  # lock file -> nesting depth, in this process
_lock_fds: set[int] = set()  # the open lock files of `exclusive_dir` in this process


def _drop_locks_in_child() -> None:
    """A process forked while a lock is held (a loader's worker) closes its copy of the lock file:
    a flock belongs to the open file, and a worker that outlived the block (a loader interrupted
    in a notebook) kept the directory locked after its holder released it."""
    for fd in _lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _lock_fds.clear()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


class OutputDirError(RuntimeError):
    """An output directory that cannot be used: another live process writes it, or it cannot be
    written (permissions, read-only mount, full disk). The CLIs print it as one line, exit 2."""


class DirectoryBusyError(OutputDirError):
    """Another live process writes the same output directory."""


def writer_temporary(path: str | os.PathLike) -> Path:
    """`path`'s temporary name for this process, `NAME.HOST-PID.tmp`: two processes writing the same
    file (the parts of a split run, two plots or fine-tunes of one run) never write into one
    temporary, and `remove_temporaries` removes those whose writer is gone."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def remove_temporaries(directory: str | os.PathLike, owned: tuple[str, ...] = ()) -> None:
    """Delete what killed writers left in `directory`: the files matching the glob patterns `owned`
    (temporaries only the caller, holding the directory's lock, writes) and each
    `NAME.HOST-PID.tmp` (`writer_temporary`) whose writer on this host is gone. A rerun
    does not overwrite the latter (a new pid), nor a checkpoint's of a step it never saves again."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    stale = [p for pattern in owned for p in directory.glob(pattern)]
    host = re.escape(socket.gethostname())
    for path in directory.glob("*.tmp"):
        if (writer := re.fullmatch(rf".+\.{host}-(\d+)\.tmp", path.name)) and not _alive(int(writer[1])):
            stale.append(path)
    for path in stale:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _recorded_pid(fd: int) -> str:
    """The pid that the holder of lock file `fd` wrote into it (`exclusive_dir`)."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "not recorded"


def lock_holder(path: str | os.PathLike) -> str | None:
    """The pid that another process holding directory `path`'s lock (`exclusive_dir`) recorded, or
    None when nobody else holds it (no lock file, a filesystem without locks, this process)."""
    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the close below
    except BlockingIOError:
        holder = _recorded_pid(fd)
        return None if holder == str(os.getpid()) else holder
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def exclusive_dir(path: str | os.PathLike, what: str, name: str = LOCK_NAME, shared: bool = False):
    """Hold the lock of directory `path` (created if missing) while the block runs. `name`: the lock
    file; `shared`: any number of shared holders, or one exclusive (the parts of a split run share
    --out with each other, never with a whole run)."""
    lock = Path(path).resolve() / name
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unwritable(lock.parent, err) from None
    _lock_fds.add(fd)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(fd)
            raise DirectoryBusyError(
                f"{lock.parent} is in use by another {what} (pid {holder}); wait for it to finish, "
                "or choose another output directory"
            ) from None
        except OSError as err:
            if err.errno not in NO_LOCKS:
                raise _unwritable(lock.parent, err) from None
            # a filesystem that takes no locks (Lustre mounted without flock): work on, and say once
            # per process what is not guarded
            if not _no_locks_said:
                _no_locks_said.append(lock.parent)
                print(f"note: {lock.parent}: the filesystem takes no file locks ({err.strerror}), so a second "
                      f"{what} there would not be stopped: run one at a time", file=sys.stderr, flush=True)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:  # a full disk: the lock's few bytes are the first write of a run
            raise _unwritable(lock.parent, err) from None
        _held[lock] = 1
        try:
            yield
        finally:
            del _held[lock]
            os.ftruncate(fd, 0)  # an empty file once released: a finished output is the same on every run
    finally:
        _lock_fds.discard(fd)
        os.close(fd)  # releases the flock


NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)  # flock's answers where locks are not kept
_no_locks_said: list[Path] = []


def _unwritable(directory: Path, err: OSError) -> OutputDirError:
    return OutputDirError(f"cannot write to the output directory {directory}: {err.strerror}")


_prctl = None


def _load_prctl():
    """libc's prctl, resolved once: a forked child of a threaded process must not dlopen (another
    thread may have held the loader's lock at the fork), so the parent resolves it beforehand."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent already died."""
    prctl = _load_prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def die_with_parent_if_child() -> None:
    """`die_with_parent` in a multiprocessing child (spawned or forked); nothing in a main process."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        die_with_parent(parent.pid)


@contextlib.contextmanager
def children_ignore_ctrl_c():
    """Processes spawned inside ignore Ctrl-C, which the terminal sends to its whole process group:
    the command stops them itself, instead of each printing a traceback from wherever it was (its
    imports included). A spawned child keeps an ignored SIGINT across exec, and Python then
    installs no KeyboardInterrupt; a handler would not survive the exec. So for the moment the
    block takes (starting the processes: milliseconds) this process ignores it too, and a Ctrl-C
    just then is lost: press it again."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: dispositions are the main thread's to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerDied(RuntimeError):
    """A pool's worker process ended without its result: the system ended it (memory ran out, a
    signal). The command stops with one line (exit 1), keeping what it finished."""


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple, what: str):
    """`workers` spawned processes (a `concurrent.futures.ProcessPoolExecutor`), started at once
    while Ctrl-C is ignored (`children_ignore_ctrl_c`). multiprocessing.Pool replaced a worker
    killed from outside (the OOM killer's SIGKILL) and waited for its lost task for good, and its
    terminate() then waited for good too when the dead worker held the task queue's lock; here the
    death raises WorkerDied from the result it held. Leaving the block ends the workers at once."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=initializer, initargs=initargs)
    try:
        with children_ignore_ctrl_c():
            for _ in range(workers):  # each submit starts a process while none is idle yet
                executor.submit(int)
        started = set(multiprocessing.active_children()) - before
        try:
            yield executor
        except BrokenProcessPool:
            for process in started:  # the executor ends the others (SIGTERM): the first to die is named
                process.join(timeout=5)
            dead = sorted((p for p in started if p.exitcode not in (None, 0)),
                          key=lambda p: p.exitcode == -signal.SIGTERM)
            how = next((f"pid {p.pid}, {_signal_name(-p.exitcode)}" if p.exitcode < 0 else
                        f"pid {p.pid}, exit status {p.exitcode}" for p in dead), "its pid unknown")
            raise WorkerDied(f"a {what} worker process died ({how}): the system ended it (memory ran out, or a "
                             "signal); with memory short, lower --workers") from None
    finally:
        for process in set(multiprocessing.active_children()) - before:  # idle, or mid-task after an error
            process.kill()
        executor.shutdown(wait=True, cancel_futures=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_registered = False
_forking_pid = 0


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def kill_forked_children_with_parent() -> None:
    """From now on every child forked by this process (and by its forked children) dies with its
    parent. PR_SET_PDEATHSIG watches the forking thread: DALI and torch fork from the thread that
    builds the pipeline or iterates the DataLoader, the trainer's main thread. Idempotent."""
    global _registered
    if _registered or not hasattr(os, "register_at_fork") or _load_prctl() is None:
        return
    os.register_at_fork(before=_before_fork, after_in_child=lambda: die_with_parent(_forking_pid))
    _registered = True
