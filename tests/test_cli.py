"""The command line: subcommands, exit status 2 with a clear message for configuration errors."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess import cli
from preprocess.cli import build_parser, main, pack_options
from preprocess.flow import backend_names

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_preprocess_shows_help():
    result = subprocess.run([sys.executable, "-m", "preprocess", "--help"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT)}, check=True)
    for command in ("ucf101", "hmdb51", "kinetics400", "synthetic", "verify", "merge"):
        assert command in result.stdout


def test_flow_options_are_passed_only_when_given(tmp_path):
    parser = build_parser()
    plain = parser.parse_args(["ucf101", "--root", "r", "--out", str(tmp_path)])
    assert pack_options(plain).flow_options == {} and pack_options(plain).flow == "tvl1"
    given = parser.parse_args(["ucf101", "--root", "r", "--out", str(tmp_path), "--flow", "tvl1-torch",
                               "--flow-device", "cpu", "--flow-batch", "8"])
    assert pack_options(given).flow_options == {"device": "cpu", "batch": 8}
    assert {"none", "tvl1"} <= set(backend_names())


@pytest.mark.parametrize("argv, message", [
    (["ucf101", "--root", "{tmp}/nowhere"], "nowhere"),
    (["hmdb51", "--root", "{tmp}", "--splits", "{tmp}/nosplits"], "nosplits"),
    (["synthetic", "--classes", "99"], "--classes"),
    (["ucf101", "--root", "{tmp}", "--jpeg-quality", "101"], "jpeg-quality"),
    (["ucf101", "--root", "{tmp}", "--flow-batch", "4"], "--flow tvl1 takes no --flow-batch (options of --flow tvl1-torch)"),
    (["ucf101", "--root", "{tmp}", "--flow", "none", "--flow-device", "cpu"], "--flow none takes no --flow-device"),
])
def test_configuration_errors_exit_2_naming_the_cause(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the output directory (and its lock) is made


def test_unknown_flow_backend_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["ucf101", "--root", str(tmp_path), "--out", str(tmp_path), "--flow", "magic"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("outcome", ["returns", "config error", "interrupted"])
def test_main_in_process_puts_back_the_callers_sigterm_handler(tmp_path, monkeypatch, outcome):
    """SIGTERM exits 143 while the command runs; called in-process (the tests do), main() must not
    leave that handler behind, or a later SIGTERM to pytest dies inside the CLI's handler."""
    during = []

    def run(args):
        during.append(signal.getsignal(signal.SIGTERM))
        if outcome == "config error":
            raise cli.ConfigError("no such root")
        if outcome == "interrupted":
            raise KeyboardInterrupt
        return 0

    def callers(signum, frame):
        raise AssertionError("not called")

    monkeypatch.setattr(cli, "_run", run)
    previous = signal.signal(signal.SIGTERM, callers)
    try:
        status = main(["verify", str(tmp_path)])
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == {"returns": 0, "config error": 2, "interrupted": 130}[outcome]
    assert during == [cli._exit_on_sigterm]
    assert after is callers


@pytest.mark.parametrize("command, end", [
    ("synthetic", "; finished shards are kept, rerun the same command to resume"),
    ("verify", ""),  # verify writes nothing: it starts over
])
@pytest.mark.parametrize("how, status, line", [
    ("sigterm", 143, "stopped (SIGTERM)"),  # was: exit 143 and nothing said (a scheduler's log)
    ("ctrl-c", 130, "interrupted (Ctrl-C)"),
    ("worker died", 1, "error: a packing worker process died (pid 7, SIGKILL)"),
])
def test_how_a_run_ended_is_one_line(tmp_path, monkeypatch, capsys, command, end, how, status, line):
    import os

    from preprocess.hygiene import WorkerDied

    def run(args):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if how == "ctrl-c":
            raise KeyboardInterrupt
        raise WorkerDied("a packing worker process died (pid 7, SIGKILL)")

    monkeypatch.setattr(cli, "_run", run)
    argv = ["verify", str(tmp_path)] if command == "verify" else ["synthetic", "--out", str(tmp_path / "out")]
    assert main(argv) == status
    if how == "worker died":
        end = "; rerun it" if command == "verify" else "; the finished shards are kept: rerun the same command to resume"
    assert capsys.readouterr().err == f"cvtcl-preprocess {command}: {line}{end}\n"


def test_a_pool_worker_that_dies_is_an_error_not_a_wait(tmp_path):
    """multiprocessing.Pool replaced a worker the system killed (the OOM killer) and waited for its
    task for good, and its terminate() waited for good too: packing hung, and SIGTERM could not end
    it. The pool now raises WorkerDied naming the worker, and ends the others."""
    import multiprocessing
    import time

    from preprocess.hygiene import WorkerDied, die_with_parent_if_child, worker_pool

    started = time.monotonic()
    with pytest.raises(WorkerDied, match=r"a packing worker process died \(pid \d+, SIGKILL\): the system ended it"):
        with worker_pool(2, die_with_parent_if_child, (), "packing") as pool:
            list(pool.map(signal.raise_signal, [signal.SIGKILL]))  # a worker that the system kills
    assert time.monotonic() - started < 60 and multiprocessing.active_children() == []
