"""launches.jsonl: every start and resume of a run says on what it ran (cvtcl/provenance.py)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cvtcl
from cvtcl import provenance
from cvtcl.train import main
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread, smoke_args  # noqa: F401 (autouse fixture)


def test_each_launch_appends_what_ran_it(tmp_path, capsys, monkeypatch):
    data, run = make_dataset(tmp_path / "data"), tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["/x/cvtcl/train.py", "--preset", "smoke"])  # the process's command line
    main(smoke_args(data, run, "run.max_steps=3"), build_loader=FakePretrainLoader)
    first_output = capsys.readouterr().out
    main(smoke_args(data, run, "run.max_steps=5"), build_loader=FakePretrainLoader)
    second_output = capsys.readouterr().out
    launches = [json.loads(line) for line in (run / "launches.jsonl").read_text().splitlines()]
    assert [launch["resumed_from_step"] for launch in launches] == [None, 3]
    assert [launch["total_steps"] for launch in launches] == [3, 5]
    for launch in launches:
        assert launch["stage"] == "stage 1 rgb" and launch["world_size"] == 1 and launch["batch_size"] == 4
        assert launch["precision"] == "fp32" and launch["compile"] == "none"
        assert launch["device"]["type"] == "cpu" and launch["device"]["cores"] >= 1
        assert launch["versions"]["torch"] == torch.__version__ and launch["versions"]["cvtcl"] == cvtcl.__version__
        assert launch["versions"]["git"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", launch["versions"]["git"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", launch["time"])
    # the same facts open the output, before the resume line
    assert first_output.splitlines()[0] == provenance.summary(launches[0])
    lines = second_output.splitlines()
    assert lines[0] == provenance.summary(launches[1]) and lines[1].startswith("resumed from")
    assert launches[1]["command"] == ["/x/cvtcl/train.py", "--preset", "smoke"]


def test_summary_of_a_multi_gpu_launch():
    record = {"stage": "co-training flow", "world_size": 8, "batch_size": 16, "precision": "bf16",
              "compile": "graph", "total_steps": 7400, "device": {"type": "cuda", "name": "NVIDIA H100"},
              "versions": {"torch": "2.11.0"}}
    assert provenance.summary(record) == ("co-training flow: 8 processes on NVIDIA H100 each, bf16, run.compile=graph, "
                                          "batch 16 per process (global 128), 7400 steps; torch 2.11.0")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_commit_of_a_checkout(tmp_path, monkeypatch):
    package = tmp_path / "checkout" / "cvtcl"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(cvtcl, "__file__", str(package / "__init__.py"))
    assert provenance.git_commit() is None  # not a checkout (a wheel install)

    def git(*args):
        return subprocess.run(["git", "-C", str(package.parent), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert provenance.git_commit() == head
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance.git_commit() == head + "+dirty"


def test_nccl_version_is_recorded_on_a_gpu_machine_and_never_stops_a_run(monkeypatch):
    import torch.cuda.nccl as nccl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nccl, "version", lambda: (2, 30, 7))
    assert provenance.versions()["nccl"] == "2.30.7"

    def no_nccl():
        raise RuntimeError("torch was built without NCCL")

    monkeypatch.setattr(nccl, "version", no_nccl)
    assert provenance.versions()["nccl"] is None
