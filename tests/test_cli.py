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
