"""The error boundary of the console commands `python -m cvtcl.train`, `python -m cvtcl.eval` and
`cvtcl-plot` (`cvtcl-preprocess` has the same boundary in preprocess/cli.py).

An expected failure (a bad flag, a missing file, a config key out of range, no GPU where one was
asked for) is one line on stderr naming the flag, key or file and what to do, with an exit status
the README documents ("Exit status"):

    0    done
    1    the work started and failed (a non-finite loss, out of GPU memory, an I/O error while running)
    2    usage or input error, found before any work; nothing was written
    130  interrupted with Ctrl-C (training checkpoints first; the line says when a rerun resumes)

Anything else is a bug and keeps its traceback; `--debug` shows the traceback of expected
failures too. `StopSignals` turns SIGTERM and Ctrl-C during training into a request that the
loop honours after the current step (checkpoint, then exit 0 or 130).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from preprocess.hygiene import OutputDirError
from preprocess.schema import LayoutError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Input the user can fix; the message names the flag, key or file and what to do."""


class RunFailed(Exception):
    """The work started and could not go on for a reason the user can act on (out of GPU memory);
    the message names the keys or flags to change."""


# Raised by our own checks with a message that says what to do, or by the OS naming a path.
USAGE_ERRORS = (UsageError, LayoutError, OutputDirError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError, NotImplementedError)
RUN_ERRORS = (FloatingPointError, OSError, RunFailed)


# torch's DataLoader raises a worker's error again in the parent with the whole traceback as its
# text; its last line is the error's own message
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\s+Original Traceback \(most recent "
                           r"call last\):.*^(?:[\w.]*\.)?\1: (.*)\Z", re.S | re.M)


def one_line(err: BaseException) -> str:
    """The message of `err` on one line: ours as written, the OS's as 'path: reason', a DataLoader
    worker's without the traceback torch wraps it in."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err.args[0]) if err.args else type(err).__name__
        if worker := _WORKER_ERROR.search(text):
            text = worker.group(2)
    return " ".join(text.split())


def brief(err: BaseException, limit: int = 100) -> str:
    """`err` in a few words, for inside our own one-line message: its type and the first sentence of
    its text, when that is short. A library's own text can run to paragraphs (torch.load's
    UnpicklingError advises on `weights_only` over several lines, a torn file's error on how files
    get corrupted), and cut at a length it would end mid-word; its first sentence says what failed."""
    lines = str(err).strip().splitlines()
    sentence = lines[0].split(". ")[0].strip().rstrip(".") if lines else ""
    return f"{type(err).__name__}: {sentence}" if sentence and len(sentence) <= limit else type(err).__name__


@contextlib.contextmanager
def interrupt_main_process_only() -> Iterator[None]:
    """Ctrl-C reaches every process of the terminal's process group: the command's, and the loader
    workers (DALI, DataLoader) it forks. Only the command raises KeyboardInterrupt; a forked worker
    inherits this handler and ignores the signal (its parent shuts it down), instead of printing
    a traceback of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_command(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` and turn expected failures into one line and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupt_main_process_only():
            return body(argv)
    except KeyboardInterrupt as interrupt:  # raised again with a note where the work can resume
        note = f"; {interrupt.args[0]}" if interrupt.args else ""
        print(f"{prog}: interrupted (Ctrl-C){note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`... --help-config | head`): nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_FAILED
    except USAGE_ERRORS + RUN_ERRORS as err:
        if any(len(arg) > 2 and "--debug".startswith(arg) for arg in argv):  # argparse takes --deb for --debug
            traceback.print_exc()  # then the same line and exit status as without it
        status = EXIT_USAGE if isinstance(err, USAGE_ERRORS) else EXIT_FAILED
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return status


_stopping_parent: list[int] = []  # the pid whose StopSignals are in place, for the fork hook
_fork_hook: list[bool] = []


def _after_fork_in_child() -> None:
    """A loader worker forked while StopSignals are in place leaves the process group (torchrun's
    and many schedulers' SIGTERM, and the terminal's Ctrl-C, go to the whole group: the trainer
    decides and stops its workers) and dies of SIGTERM again: DALI's pool stops its other workers
    with SIGTERM when one dies, and a worker that ignored it left the trainer waiting for good."""
    if not _stopping_parent:
        return
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(ValueError):  # the forking thread is this child's main thread
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StopSignals:
    """SIGTERM and Ctrl-C (SIGINT) during a run: remember the first, so that the loop checkpoints
    after the current step and stops. A second Ctrl-C stops at once (KeyboardInterrupt).

    Installed before the loader exists. Loader workers forked later leave the process group (a
    signal to the group is the trainer's to act on) and take SIGTERM's default back, so that the
    pool that made them can stop them (`_after_fork_in_child`); they ignore Ctrl-C. torch's
    DataLoader workers put their own SIGTERM handler in place (they die of a SIGTERM their parent
    did not send), so the baseline loader's workers leave the group too (dali_pipelines/baseline.py);
    spawned workers (DALI on a GPU) start with Python's defaults."""

    def __init__(self):
        self.received: int | None = None
        self.pid = os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked loader worker: its parent decides and shuts it down
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook.append(True)
        _stopping_parent.append(self.pid)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stopping_parent.remove(self.pid)
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def describe(self) -> str:
        """How the stop was asked for, for the run's last line."""
        if self.received is None:
            return "stop requested on another rank"
        return "Ctrl-C" if self.received == signal.SIGINT else "SIGTERM"
