"""The trainer end to end on CPU with the in-memory fake loader: run, resume, stop, errors, two ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cvtcl.checkpoint import is_complete, latest_checkpoint, load_checkpoint, load_encoder
from cvtcl.metrics import read_metrics
from cvtcl.train import main
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
FAKE_TRAIN = str(ROOT / "tests" / "trainer_fakes.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "fake")


def _args(dataset, out_dir, *extra):
    return ["--preset", "smoke", f"data.root={dataset}", f"run.out_dir={out_dir}", "loss.queue_size=16",
            "run.progress=plain", "optim.epochs=10", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def _losses(run_dir):
    """step -> every loss and accuracy term of metrics.jsonl."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss", "top1"))} for r in read_metrics(run_dir / "metrics.jsonl")}


def test_run_writes_metrics_config_checkpoints_and_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    assert main(_args(dataset, out, "run.max_steps=6", "run.log_every=3"), build_loader=FakePretrainLoader) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    assert {"loss", "loss_instance", "loss_local", "loss_temporal", "top1_instance", "top1_temporal", "lr",
            "clips_per_s", "data_s", "compute_s", "data_wait_fraction", "peak_memory_gib"} <= set(records[0])
    assert json.loads((out / "config.json").read_text())["data"]["root"] == str(dataset)
    assert not is_complete(out)  # stopped by max_steps, not at the end of its epochs
    state = load_checkpoint(latest_checkpoint(out))
    assert (state["step"], state["epoch"], state["epoch_step"]) == (6, 1, 2)  # 4 steps per epoch
    encoder, config = load_encoder(latest_checkpoint(out))
    assert encoder.backbone_name == "tiny" and config["run"]["max_steps"] == 6
    # Rerunning with a larger budget resumes at step 7; changing what is computed is refused.
    assert main(_args(dataset, out, "run.max_steps=9", "run.log_every=3"), build_loader=FakePretrainLoader) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3, 6, 9]
    with pytest.raises(ValueError, match="different config .optim.lr.*new run.out_dir"):
        main(_args(dataset, out, "run.max_steps=12", "optim.lr=0.1"), build_loader=FakePretrainLoader)


def test_complete_after_all_epochs(dataset, tmp_path):
    assert main(_args(dataset, tmp_path, "optim.epochs=1"), build_loader=FakePretrainLoader) == 0
    assert is_complete(tmp_path) and load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    assert main(_args(dataset, tmp_path, "optim.epochs=1"), build_loader=FakePretrainLoader) == 0  # nothing left
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [4]


def _never_called(**kwargs):
    raise AssertionError("the loader was built before validation finished")


@pytest.mark.parametrize("extra,error,message", [
    (["loss.queue_size=18"], ValueError, r"queue_size=18 is not divisible by the global batch 4.*loss.queue_size=16"),
    (["stage.modality=flow", "data.root={nofl}"], ValueError, "without flow"),
    (["data.root={missing}"], FileNotFoundError, "shard.*missing.*shard-00000.h5"),
    (["data.root={nowhere}"], FileNotFoundError, "no manifest.json"),
    (["run.expect_world_size=8"], ValueError, "laid out for 8 processes, got WORLD_SIZE=1"),
    (["data.batch_size=32", "loss.queue_size=64"], ValueError, "fewer than one global batch"),
    (["stage.init_checkpoint=/nonexistent.pt"], FileNotFoundError, "init_checkpoint"),
])
def test_errors_before_any_work(dataset, tmp_path, extra, error, message):
    nofl = make_dataset(tmp_path / "noflow", num_videos=4, with_flow=False)
    missing = make_dataset(tmp_path / "missing", num_videos=4)
    (missing / "shard-00000.h5").unlink()
    paths = {"nofl": nofl, "missing": missing, "nowhere": tmp_path / "nowhere"}
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        main(_args(dataset, out, *[e.format(**paths) for e in extra]), build_loader=_never_called)
    assert not out.exists()


def test_cli_reports_bad_preset_and_unknown_key():
    for args, message in ((["--preset", "smokey"], "unknown preset 'smokey': did you mean 'smoke'"),
                          (["--preset", "smoke", "optim.lrr=1"], "did you mean 'optim.lr'")):
        done = subprocess.run([sys.executable, "-m", "cvtcl.train", *args], env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def _start(dataset, out, *extra):
    return subprocess.Popen([sys.executable, FAKE_TRAIN, *_args(dataset, out, *extra)], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.multiprocess
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(dataset, tmp_path):
    common = ("run.max_steps=24", "run.log_every=1", "run.checkpoint_every=4")
    whole = _start(dataset, tmp_path / "whole", *common)
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = _start(dataset, tmp_path / "killed", *common)
    _wait_for(lambda: (tmp_path / "killed" / "checkpoint-00000008.pt").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["step"] < 24
    resumed = _start(dataset, tmp_path / "killed", *common)
    assert resumed.wait(timeout=300) == 0
    assert "resumed from" in resumed.stdout.read()
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 25))
    assert got == expected


@pytest.mark.multiprocess
def test_sigterm_checkpoints_at_the_next_step_and_exits_zero(dataset, tmp_path):
    out = tmp_path / "run"
    process = _start(dataset, out, "run.max_steps=100000", "optim.epochs=100000", "run.log_every=1")
    _wait_for(lambda: len(read_metrics(out / "metrics.jsonl")) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    assert "SIGTERM: checkpoint saved at step" in process.stdout.read()
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert load_checkpoint(latest_checkpoint(out))["step"] == last


@pytest.mark.multiprocess
def test_torchrun_two_ranks_share_one_queue(dataset, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", FAKE_TRAIN,
               *_args(dataset, out, "run.max_steps=2", "run.log_every=1")]
    done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    state = load_checkpoint(latest_checkpoint(out))
    loader = FakePretrainLoader(dataset, batch_size=4, world_size=2)
    expected = [i for step in (0, 1) for rank in (0, 1) for i in loader.batch_indices(0, step, rank)]
    assert state["model"]["queue.video_index"].tolist() == expected  # 16 slots: both ranks, both steps
    assert int(state["model"]["queue.count"]) == 16
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
