"""The error boundary of the console commands `python -m cvtcl.train`, `python -m cvtcl.eval` and
`cvtcl-plot` (`cvtcl-preprocess` has the same boundary in preprocess/cli.py).

An expected failure (a bad flag, a missing file, a config key out of range, no GPU where one was
asked for) is one line on stderr naming the flag, key or file and what to do, with an exit status
the README documents ("Exit status"):

    0    done
    1    the work started and failed (a non-finite loss, an I/O error while running)
    2    usage or input error, found before any work; nothing was written
    130  interrupted with Ctrl-C (training checkpoints first)

Anything else is a bug and keeps its traceback; `--debug` shows the traceback of expected
failures too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from preprocess.schema import LayoutError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Input the user can fix; the message names the flag, key or file and what to do."""


# Raised by our own checks with a message that says what to do, or by the OS naming a path.
USAGE_ERRORS = (UsageError, LayoutError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError, NotImplementedError)
RUN_ERRORS = (FloatingPointError, OSError)


def one_line(err: BaseException) -> str:
    """The message of `err` on one line: ours as written, the OS's as 'path: reason'."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err.args[0]) if err.args else type(err).__name__
    return " ".join(text.split())


def run_command(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` and turn expected failures into one line and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USAGE_ERRORS + RUN_ERRORS as err:
        if "--debug" in argv:
            raise
        status = EXIT_USAGE if isinstance(err, USAGE_ERRORS) else EXIT_FAILED
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return status
