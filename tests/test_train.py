"""The trainer end to end on CPU with the in-memory fake loader: run, resume, stop, errors, two ranks."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from cvtcl.checkpoint import is_complete, latest_checkpoint, load_checkpoint, load_encoder, save_atomic
from cvtcl.metrics import read_metrics
from cvtcl.models import Encoder
from cvtcl.train import cli, main
from dali_pipelines.toy_shards import write_toy_dataset
from preprocess.schema import LayoutError
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread, smoke_args, two_nodes  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
FAKE_TRAIN = str(ROOT / "tests" / "trainer_fakes.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "fake")


_args = smoke_args


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
    state = load_checkpoint(latest_checkpoint(out))
    torch.save(state | {"world_size": 2}, latest_checkpoint(out))
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        main(_args(dataset, out, "run.max_steps=12"), build_loader=_never_called)


def test_a_checkpoint_without_a_key_added_since_resumes_at_its_default(dataset, tmp_path):
    """A key added in a later version is absent from older checkpoints' configs: the run had its
    default's behaviour, so it resumes when the value is still the default and is refused otherwise."""
    out = tmp_path / "run"
    assert main(_args(dataset, out, "run.max_steps=2"), build_loader=FakePretrainLoader) == 0
    state = load_checkpoint(latest_checkpoint(out))
    for key in ("crop_scale_min", "dihedral"):
        del state["config"]["data"][key]
    torch.save(state, latest_checkpoint(out))
    with pytest.raises(ValueError, match=r"different config \(data.dihedral\)"):
        main(_args(dataset, out, "run.max_steps=3", "data.dihedral=true"), build_loader=_never_called)
    assert main(_args(dataset, out, "run.max_steps=3"), build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(out))["step"] == 3


def test_a_moved_run_directory_resumes(dataset, tmp_path):
    """run.out_dir is where the run is found, not what it computes: a run directory moved elsewhere
    resumes there, and a refusal lists only the keys that matter."""
    assert main(_args(dataset, tmp_path / "run", "run.max_steps=2", "run.log_every=1"),
                build_loader=FakePretrainLoader) == 0
    moved = (tmp_path / "run").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"different config \(optim.lr\); "):
        main(_args(dataset, moved, "run.max_steps=3", "optim.lr=0.1"), build_loader=_never_called)
    assert main(_args(dataset, moved, "run.max_steps=3", "run.log_every=1", "run.expect_world_size=1"),
                build_loader=FakePretrainLoader) == 0
    assert [r["step"] for r in read_metrics(moved / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_resumes_with_its_dataset_named_another_way_or_copied_elsewhere(dataset, tmp_path, monkeypatch):
    """data.root is compared by what it holds: a relative spelling from another working directory,
    or a copy of the dataset on another disk (the manifest's digest, recorded in each checkpoint),
    resumes; another dataset under data.root is refused."""
    import shutil

    monkeypatch.chdir(dataset.parent)
    out = tmp_path / "run"
    assert main(_args(Path(dataset.name), out, "run.max_steps=2"), build_loader=FakePretrainLoader) == 0
    assert json.loads((out / "config.json").read_text())["data"]["root"] == str(dataset)  # made absolute
    monkeypatch.chdir(tmp_path)
    copy = Path(shutil.copytree(dataset, tmp_path / "local" / "copy"))
    assert main(_args(Path("local/copy"), out, "run.max_steps=3"), build_loader=FakePretrainLoader) == 0
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == 3 and state["config"]["data"]["root"] == str(copy)
    # a checkpoint from before the digest: only the same folder, however it is spelled
    torch.save({k: v for k, v in state.items() if k != "dataset"}, latest_checkpoint(out))
    with pytest.raises(ValueError, match=r"different config \(data.root\)"):
        main(_args(dataset, out, "run.max_steps=4"), build_loader=_never_called)
    monkeypatch.chdir(copy.parent)
    assert main(_args(Path("copy"), out, "run.max_steps=4"), build_loader=FakePretrainLoader) == 0
    # with the digest again: another dataset is refused under another path, and under the same path too
    other = make_dataset(tmp_path / "other", num_videos=12)
    with pytest.raises(ValueError, match="was trained on another dataset than data.root=.*other holds now"):
        main(_args(other, out, "run.max_steps=5"), build_loader=_never_called)
    shutil.rmtree(copy)
    shutil.copytree(other, copy)
    with pytest.raises(ValueError, match="was trained on another dataset than data.root=.*copy holds now"):
        main(_args(copy, out, "run.max_steps=6"), build_loader=_never_called)


def test_a_runs_config_json_resumes_it_from_any_directory_and_after_a_move(dataset, tmp_path, monkeypatch):
    """`--config RUN/config.json` resumes RUN (its folder), whatever the working directory and
    wherever RUN was moved; run.out_dir given with it still wins."""
    monkeypatch.chdir(tmp_path)
    assert main(_args(dataset, Path("runs/rgb"), "run.max_steps=2"), build_loader=FakePretrainLoader) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--config", "../runs/rgb/config.json", "run.max_steps=3"], build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "runs" / "rgb"))["step"] == 3
    assert not (elsewhere / "runs").exists()  # was: a new run from step 1 in ./runs/rgb
    moved = (tmp_path / "runs" / "rgb").rename(tmp_path / "moved")
    assert main(["--config", str(moved / "config.json"), "run.max_steps=4"], build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(moved))["step"] == 4
    assert main(["--config", str(moved / "config.json"), "run.max_steps=1", f"run.out_dir={tmp_path / 'fresh'}"],
                build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "fresh"))["step"] == 1


def test_overrides_on_both_sides_of_an_option_all_apply(dataset, tmp_path):
    """`… data.batch_size=2 --stage X run.max_steps=2`: the second block was "unrecognized arguments"."""
    assert main([*_args(dataset, tmp_path, "run.max_steps=5"), "--debug", "run.max_steps=2"],
                build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 2


def test_a_world_size_refusal_counts_processes_in_english():
    from cvtcl.config import TrainConfig
    from cvtcl.preflight import check_resumable

    with pytest.raises(ValueError, match="written by 1 process, this run has 2: the data order"):
        check_resumable(TrainConfig(), 2, {"world_size": 1, "config": {}}, Path("checkpoint-00000004.pt"))


def test_complete_after_all_epochs(dataset, tmp_path, capsys):
    """A rerun of a complete run says so and does nothing (it said "resumed" and "stopped", and with
    optim.epochs lowered rewrote config.json to epochs the run never had)."""
    assert main(_args(dataset, tmp_path, "optim.epochs=2"), build_loader=FakePretrainLoader) == 0
    assert is_complete(tmp_path) and load_checkpoint(latest_checkpoint(tmp_path))["step"] == 8
    capsys.readouterr()
    for epochs in (2, 1):  # nothing left
        assert main(_args(dataset, tmp_path, f"optim.epochs={epochs}"), build_loader=_never_called) == 0
        assert capsys.readouterr().out == (f"{tmp_path} is complete (step 8, optim.epochs=2): nothing to do; raise "
                                           "optim.epochs to train longer\n")
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["epochs"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 8]
    assert len((tmp_path / "launches.jsonl").read_text().splitlines()) == 1


def test_epochs_lowered_below_where_a_run_stands_complete_it(dataset, tmp_path, capsys):
    """optim.epochs may change on resume; lowered to where the run already is, the run is complete
    (it said "stopped at step 6 of 4" and stayed incomplete, and a schedule reran it for good)."""
    assert main(_args(dataset, tmp_path, "optim.epochs=3", "run.max_steps=6"), build_loader=FakePretrainLoader) == 0
    assert not is_complete(tmp_path)
    capsys.readouterr()
    assert main(_args(dataset, tmp_path, "optim.epochs=1"), build_loader=FakePretrainLoader) == 0
    assert "step 6 is at or past the end of optim.epochs=1 (4 steps): the run is complete" in capsys.readouterr().out
    assert is_complete(tmp_path) and load_checkpoint(latest_checkpoint(tmp_path))["step"] == 6


@pytest.mark.parametrize("progress,expected", [("rich", "train"),
                                               ("plain", r"step 1/2 epoch 0 loss=\S+ .* eta \d+:\d\d:\d\d\n")])
def test_progress_modes(dataset, tmp_path, capsys, progress, expected):
    """plain (a job's log): each line says how far of how many steps, and the time left."""
    import re

    args = _args(dataset, tmp_path, "run.max_steps=2", "run.log_every=1", f"run.progress={progress}")
    assert main(args, build_loader=FakePretrainLoader) == 0
    assert re.search(expected, capsys.readouterr().out)


def _never_called(**kwargs):
    raise AssertionError("the loader was built before validation finished")


def flip_index_byte(shard: Path) -> None:
    """Damage the shard's index, not its frame data: one byte of the second rgb offset."""
    import h5py

    with h5py.File(shard, "r") as h5:
        position = h5["rgb"]["offsets"].id.get_offset() + 8
    content = bytearray(shard.read_bytes())
    content[position] ^= 0xFF
    shard.write_bytes(bytes(content))


@pytest.mark.parametrize("extra,error,message", [
    (["loss.queue_size=18"], ValueError, r"queue_size=18 is not divisible by the global batch 4.*loss.queue_size=16"),
    (["stage.modality=flow", "data.root={nofl}"], ValueError, "without flow"),
    (["data.root={missing}"], FileNotFoundError, "shard.*missing.*shard-00000.h5"),
    (["data.root={nowhere}"], FileNotFoundError, "no manifest.json"),
    (["run.expect_world_size=8"], ValueError, "laid out for 8 processes, got WORLD_SIZE=1"),
    (["stage.modality=flow", "data.root={single}"], LayoutError, r"single: 1 video\(s\) of a single frame have no "
                                                                 r"flow \(first: v_class1_g03_c01\); pack the dataset anew"),
    (["data.subset=validate", "data.root={empty_subset}"], ValueError,
     r"split 1 subset validate has no videos; choose another data.split / data.subset \(there: 1: test \(4\), "
     r"train \(16\), validate \(0\)\)"),
    (["loss.bn_groups=5"], ValueError, "loss.bn_groups=5 is more than data.batch_size=4: .*lower loss.bn_groups"),
    # torch.chunk made 2 groups of 2 for 3 asked (and 3, 3, 3, 1 for 4 of a batch of 10)
    (["loss.bn_groups=3"], ValueError, "loss.bn_groups=3 does not divide data.batch_size=4: .*equal size"),
    (["data.batch_size=32", "loss.queue_size=64"], ValueError, "fewer than one global batch"),
    (["stage.init_checkpoint=/nonexistent.pt"], FileNotFoundError, "init_checkpoint"),
    (["data.root={damaged}"], LayoutError, r"shard-00000.h5: its index .* is damaged.*cvtcl-preprocess verify"),
    (["stage.init_checkpoint={text}"], ValueError, r"stage.init_checkpoint=.*text.pt: not a checkpoint of cvtcl.train"),
    (["stage.init_checkpoint={flow}"], ValueError, r"flow.pt holds another encoder: modality flow \(this run: rgb\), "
                                                   r"embed_dim 8 \(this run: 128\)"),
    (["stage.init_checkpoint={tmp}"], FileNotFoundError, "is a directory; give one of its checkpoint-"),
])
def test_errors_before_any_work(dataset, tmp_path, extra, error, message):
    """Refused before the loader is built and before run.out_dir exists: nothing is written."""
    nofl = make_dataset(tmp_path / "noflow", num_videos=4, with_flow=False)
    missing = make_dataset(tmp_path / "missing", num_videos=4)
    (missing / "shard-00000.h5").unlink()
    damaged = make_dataset(tmp_path / "damaged")
    empty_subset = make_dataset(tmp_path / "empty-subset")
    manifest = json.loads((empty_subset / "manifest.json").read_text())
    manifest["splits"]["1"]["validate"] = []
    (empty_subset / "manifest.json").write_text(json.dumps(manifest))
    single = write_toy_dataset(tmp_path / "single", num_videos=8, num_short=1, short_frames=1, height=16, width=16)
    flip_index_byte(damaged / "shard-00000.h5")
    (tmp_path / "text.pt").write_text("this is not a checkpoint\n")
    save_atomic(tmp_path / "flow.pt", {"step": 1, "encoder": Encoder("flow", "tiny", embed_dim=8).config()})
    paths = {"nofl": nofl, "missing": missing, "nowhere": tmp_path / "nowhere", "damaged": damaged,
             "text": tmp_path / "text.pt", "single": single, "empty_subset": empty_subset,
             "flow": tmp_path / "flow.pt", "tmp": tmp_path}
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        main(_args(dataset, out, *[e.format(**paths) for e in extra]), build_loader=_never_called)
    assert not out.exists()


def test_cli_reports_bad_preset_and_unknown_key(capsys):
    done = subprocess.run([sys.executable, "-m", "cvtcl.train", "--preset", "smokey"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown preset 'smokey': did you mean 'smoke'" in done.stderr
    assert "Traceback" not in done.stderr
    assert cli(["--preset", "smoke", "optim.lrr=1"]) == 2
    assert "cvtcl.train: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in capsys.readouterr().err


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
    # The uninterrupted reference runs in this process (one torch thread, as the subprocesses).
    assert main(_args(dataset, tmp_path / "whole", *common), build_loader=FakePretrainLoader) == 0

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
@pytest.mark.parametrize("signum,status,name", [(signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_stop_signal_checkpoints_at_the_next_step(dataset, tmp_path, signum, status, name):
    """SIGTERM (a scheduler's preemption) exits 0; Ctrl-C (SIGINT) does the same and exits 130. Each
    checkpoints after the current step and prints one line, no traceback."""
    out = tmp_path / "run"
    process = _start(dataset, out, "run.max_steps=100000", "optim.epochs=100000", "run.log_every=1")
    _wait_for(lambda: len(read_metrics(out / "metrics.jsonl")) >= 3, process)
    process.send_signal(signum)
    assert process.wait(timeout=120) == status
    printed = process.stdout.read()
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed
    step = load_checkpoint(latest_checkpoint(out))["step"]
    assert step == read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert [line for line in printed.splitlines() if line.startswith(name)] == [
        f"{name}: checkpoint saved at step {step}; rerun the same command to resume"]


class _SignalledLoader(FakePretrainLoader):
    """The fake loader, ended as a job's SIGTERM to all its processes ends a real one: the trainer gets
    the signal and its workers die of it, which the loader raises (LoaderFailed) while the trainer
    waits for the third batch of epoch 0."""

    def epoch(self, epoch, start_step=0):
        from dali_pipelines.iterate import LoaderFailed

        for step, batch in enumerate(super().epoch(epoch, start_step), start=start_step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                raise LoaderFailed("a loader worker process died at epoch 0 step 2 (killed by signal)")
            yield batch


def test_a_signal_that_also_ends_the_loader_still_checkpoints(dataset, tmp_path, capsys):
    """SLURM (time limit, scancel) and systemd signal every process of a job at once: the loader's
    workers died with the trainer's SIGTERM, and the trainer, waiting for a batch, ended with the
    loader's error (exit 1, blaming memory or /dev/shm), the steps since its last checkpoint lost.
    Every step done is whole then: it checkpoints as for any stop."""
    out = tmp_path / "run"
    args = _args(dataset, out, "run.checkpoint_every=1000", "run.log_every=1000")
    assert main(args, build_loader=_SignalledLoader) == 0
    state = load_checkpoint(latest_checkpoint(out))
    assert (state["step"], state["epoch"], state["epoch_step"]) == (2, 0, 2)
    assert "SIGTERM: checkpoint saved at step 2; rerun the same command to resume" in capsys.readouterr().out


def test_a_worker_death_signalled_mid_step_waits_for_the_step(dataset, tmp_path, monkeypatch, capsys):
    """torch's DataLoader raises a worker's death from its SIGCHLD handler in whatever the main thread
    runs: mid-step, the model half updated, nothing could be checkpointed. The signal is held until the
    step is done: a stop whose SIGTERM ended the workers too checkpoints that step."""
    from cvtcl import engine

    def torch_like_handler(signum, frame):  # raises once a worker died (other children's ends pass)
        if len(calls) >= 2:
            raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    real_step, calls = engine.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the job's SIGTERM reaches the trainer and its worker mid-step
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGCHLD)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)
    previous = signal.signal(signal.SIGCHLD, torch_like_handler)
    try:
        assert main(_args(dataset, tmp_path / "run", "run.checkpoint_every=1000"), build_loader=FakePretrainLoader) == 0
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 2
    assert "SIGTERM: checkpoint saved at step 2; rerun the same command to resume" in capsys.readouterr().out


def test_config_file_yaml_and_a_runs_own_config_json(dataset, tmp_path, capsys):
    """--config FILE is validated like overrides; a run's config.json reruns (and resumes) the run as is."""
    (tmp_path / "run.yaml").write_text(
        f"data:\n  root: {dataset}\n  split: 1\nloss:\n  queue_size: 16\noptim:\n  lr: 5e-4\n  epochs: 10\n"
        f"run:\n  out_dir: {tmp_path / 'run'}\n  max_steps: 2\n  progress: none\n")
    assert main(["--preset", "smoke", "--config", str(tmp_path / "run.yaml")], build_loader=FakePretrainLoader) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["data"]["split"] == "1" and saved["model"]["backbone"] == "tiny"
    # the run's own config.json, with no preset: the same config, so it resumes the same run
    assert main(["--config", str(tmp_path / "run" / "config.json"), "run.max_steps=3"],
                build_loader=FakePretrainLoader) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 3
    with pytest.raises(ValueError, match="different config .optim.lr"):
        main(["--config", str(tmp_path / "run" / "config.json"), "optim.lr=0.1", "run.max_steps=4"],
             build_loader=_never_called)


def test_tensorboard_events_when_it_is_installed(dataset, tmp_path, monkeypatch):
    """The `tensorboard` extra: every sub-stage run (so `make demo` too) writes scalars beside metrics.jsonl."""
    written = []

    class Writer:
        def __init__(self, log_dir, purge_step):
            Path(log_dir).mkdir(parents=True)
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            written.append((Path(self.log_dir).parent.name, name, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert main(_args(dataset, tmp_path / "run", "run.max_steps=2", "run.log_every=1"),
                build_loader=FakePretrainLoader) == 0
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert {("run", "train/loss", 1), ("run", "train/loss", 2), ("run", "train/lr", 2)} <= set(written)


def test_help_config_shows_the_presets_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "smoke", "--help-config", "optim.lr=0.002"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    assert "model.backbone = 'tiny'" in listed and "data.crop_size = 32" in listed and "optim.lr = 0.002" in listed
    with pytest.raises(SystemExit):
        main(["--help-config"])
    assert "model.backbone = 's3d'" in capsys.readouterr().out


def _torchrun_two_ranks(dataset, out, *extra, env=None) -> subprocess.CompletedProcess:
    """The fake-loader trainer under torchrun, two gloo ranks; asserts it exits 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", FAKE_TRAIN,
               *_args(dataset, out, *extra)]
    done = subprocess.run(command, env={**_env(), **(env or {})}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.multiprocess
def test_torchrun_two_ranks_share_one_queue(dataset, tmp_path):
    out = tmp_path / "run"
    done = _torchrun_two_ranks(dataset, out, "run.max_steps=2", "run.log_every=1")
    assert "Warning" not in done.stderr, done.stderr  # e.g. DDP's deprecated broadcast_buffers (torch 2.14)
    state = load_checkpoint(latest_checkpoint(out))
    loader = FakePretrainLoader(dataset, batch_size=4, world_size=2)
    expected = [i for step in (0, 1) for rank in (0, 1) for i in loader.batch_indices(0, step, rank)]
    assert state["model"]["queue.video_index"].tolist() == expected  # 16 slots: both ranks, both steps
    assert int(state["model"]["queue.count"]) == 16
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.multiprocess
def test_two_nodes_train_as_one_node_of_two_processes(dataset, tmp_path):
    """The README's launch on several nodes (torchrun's c10d rendezvous), as two nodes of one
    process each on this machine, writing to one run directory as to a shared file system:
    LOCAL_RANK is 0 on both nodes and RANK tells them apart, so a process that split the data or
    wrote files by LOCAL_RANK would not give one node's result. Same checkpoint bitwise, and the
    files written once."""
    nodes = tmp_path / "nodes"
    done = two_nodes([FAKE_TRAIN, *_args(dataset, nodes, "run.max_steps=2", "run.log_every=1")], _env(), ROOT)
    assert [status for status, _ in done] == [0, 0], "\n".join(log for _, log in done)
    one = tmp_path / "one-node"
    _torchrun_two_ranks(dataset, one, "run.max_steps=2", "run.log_every=1")
    got, expected = (load_checkpoint(latest_checkpoint(d)) for d in (nodes, one))
    assert got["world_size"] == expected["world_size"] == 2
    assert got["model"].keys() == expected["model"].keys()
    assert all(torch.equal(got["model"][k], expected["model"][k]) for k in expected["model"])
    assert _losses(nodes) == _losses(one) and [r["step"] for r in read_metrics(nodes / "metrics.jsonl")] == [1, 2]
    assert len((nodes / "launches.jsonl").read_text().splitlines()) == 1


@pytest.mark.multiprocess
def test_torchrun_with_compiled_encoders_trains_as_the_eager_encoders(dataset, tmp_path):
    """run.compile=encoder under DDP (two ranks; no fullgraph there, DDP's hooks sit outside the
    compiled code): the same weights, queue and BN statistics as the eager run, bitwise, as the
    eager backend runs the traced ops as they are."""
    def run(out, *extra):
        done = _torchrun_two_ranks(dataset, out, "run.max_steps=3", "run.log_every=1", *extra,
                                   env={"CVTCL_FAKE_COMPILE_BACKEND": "eager"})
        return done.stderr.count("compiling an encoder"), load_checkpoint(latest_checkpoint(out))["model"]

    (compiles, compiled), (none, eager) = run(tmp_path / "compiled", "run.compile=encoder"), run(tmp_path / "eager")
    assert (compiles, none) == (4, 0)  # query and key on each rank
    assert compiled.keys() == eager.keys()
    assert all(torch.equal(compiled[k], eager[k]) for k in eager), [k for k in eager if not torch.equal(compiled[k], eager[k])]


def _real_loader_or_skip():
    pytest.importorskip("nvidia.dali", reason="the real loader runs DALI's CPU-only mode")
    return pytest.importorskip("cvtcl.data")


def test_real_loader_feeds_the_trainer(request, tmp_path):
    """A few steps through cvtcl.data's DALI loader (CPU mode) on the shared tiny synthetic dataset."""
    _real_loader_or_skip()
    try:
        dataset = request.getfixturevalue("synthetic_dataset")
    except pytest.FixtureLookupError:
        pytest.skip("the synthetic_dataset fixture (preprocess) is not on this branch yet")
    args = ["--preset", "smoke", f"data.root={dataset}", f"run.out_dir={tmp_path}", "data.batch_size=2",
            "loss.queue_size=8", "run.max_steps=3", "run.log_every=1", "run.progress=none", "optim.epochs=10"]
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_stage1_learns_on_synthetic_shards(tmp_path_factory, modality):
    """A few hundred CPU steps of stage 1 on real synthetic shards: the instance loss falls and the
    contrastive top-1 rises (recorded in metrics.jsonl). ~2 minutes per modality on 2 cores."""
    _real_loader_or_skip()
    from preprocess.cli import main as preprocess

    root = tmp_path_factory.getbasetemp() / "synthetic-learn"
    if not (root / "manifest.json").exists():
        assert preprocess(["synthetic", "--out", str(root), "--classes", "4", "--videos-per-class", "8",
                           "--clips-per-group", "2", "--test-groups", "1", "--frames", "24", "--height", "32",
                           "--width", "40", "--workers", "1", "--videos-per-shard", "8"]) == 0
    out = tmp_path_factory.mktemp(f"learn-{modality}")
    args = ["--preset", "smoke", f"data.root={root}", f"run.out_dir={out}", f"stage.modality={modality}",
            "loss.queue_size=16", "run.max_steps=400", "run.log_every=25", "run.progress=none", "optim.epochs=1000"]
    assert main(args) == 0
    records = read_metrics(out / "metrics.jsonl")
    first, last = records[:3], records[-3:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    print(modality, {key: (round(mean(first, key), 3), round(mean(last, key), 3))
                     for key in ("loss_instance", "top1_instance", "loss_temporal", "top1_temporal")})
    assert mean(last, "loss_instance") < 0.95 * mean(first, "loss_instance")
    assert mean(last, "top1_instance") > mean(first, "top1_instance") + 0.1


def test_plan_prints_every_sub_stage_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """--plan: epochs, steps per epoch, steps and clips of each sub-stage at WORLD_SIZE processes,
    from the dataset's split; no run directory, no process group."""
    from cvtcl.preflight import epoch_steps
    from cvtcl.presets import get_preset

    data = make_dataset(tmp_path / "data")
    args = ["--preset", "smoke-cvtcl", f"data.root={data}", f"run.out_dir={tmp_path / 'run'}", "loss.queue_size=16",
            "data.batch_size=2", "--plan"]
    for world in (1, 2):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
        lines = capsys.readouterr().out.splitlines()
        config = get_preset("smoke-cvtcl")
        config.data.root, config.data.batch_size = str(data), 2
        per_epoch = epoch_steps(config, world)
        rows = [line.split() for line in lines[2:8]]
        assert [r[0] for r in rows] == ["stage1-rgb", "stage1-flow", "cycle1-rgb", "cycle1-flow", "cycle2-rgb",
                                        "cycle2-flow"]
        assert all(r[3] == str(per_epoch) and r[4] == str(2 * per_epoch) for r in rows)  # 2 epochs each
        assert lines[8].split()[1:] == [f"{12 * per_epoch:,}", f"{12 * per_epoch * 2 * world:,}"]
        assert f"on {world} process(es)" in lines[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="loss.queue_size=15 is not divisible"):
        main([*args[:-1], "loss.queue_size=15", "--plan"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="loss.bn_groups=3 is more than data.batch_size=2"):  # --plan said yes
        main([*args[:-1], "loss.bn_groups=3", "--plan"])
    # a co-training queue that does not fill: the key to raise is the schedule's, not optim.epochs
    with pytest.raises(ValueError, match="schedule.cotrain_epochs"):
        main([*args[:-1], "loss.queue_size=512", "--plan"])
    for world, problem in (("abc", "must be integers"), ("0", "at least one process")):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ValueError, match=problem):
            main(args)
