"""Stage 2 in the one training loop, and the whole schedule from one command (fake loader, CPU)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cvtcl.checkpoint import is_complete, latest_checkpoint, load_checkpoint, save_checkpoint
from cvtcl.config import apply_overrides
from cvtcl.cotrain import FrozenSampler, load_sampler, stage_config
from cvtcl.distributed import DistInfo
from cvtcl.engine import read_terms, train_step
from cvtcl.metrics import read_metrics
from cvtcl.models import Encoder
from cvtcl.moco import MomentumContrast
from cvtcl.presets import get_preset
from cvtcl.schedule import StageRun, SubStage, cvtcl_schedule
from cvtcl.train import build_context, main
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SUB_STAGES = [s.name for s in cvtcl_schedule(cycles=2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "fake")


def _sampler_checkpoint(path, modality, embed_dim=128):
    torch.manual_seed(1)
    encoder = Encoder(modality, "tiny", embed_dim)
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "model": MomentumContrast(encoder, 16).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": {}, "complete": True}
    return save_checkpoint(path, state)


def _cotrain_config(dataset, sampler, *extra):
    return apply_overrides(get_preset("smoke"), [
        f"data.root={dataset}", "stage.kind=cotrain", "stage.modality=rgb", f"stage.sampler_checkpoint={sampler}",
        "loss.queue_size=8", *extra])


def test_frozen_sampler_stays_in_eval_mode_without_gradients(tmp_path):
    sampler = load_sampler(_cotrain_config(tmp_path, _sampler_checkpoint(tmp_path / "flow", "flow")), torch.device("cpu"))
    holder = torch.nn.ModuleDict({"sampler": sampler}).train()
    assert not any(m.training for m in sampler.modules())
    out = sampler(torch.randn(2, 2, 8, 32, 32))
    assert out.shape == (2, 128) and not out.requires_grad
    assert not any(p.requires_grad for p in holder.parameters())
    x = torch.randn(4, 2, 8, 32, 32)
    torch.testing.assert_close(sampler(x)[:2], sampler(x[:2]))  # eval BN: no dependence on the batch


def test_sampler_of_the_wrong_modality_is_refused(dataset, tmp_path):
    """By the sampler's loader, and by the trainer before any work: no loader, no run directory."""
    from cvtcl.train import main

    config = _cotrain_config(tmp_path, _sampler_checkpoint(tmp_path / "rgb", "rgb"))
    with pytest.raises(ValueError, match="holds a rgb encoder; training rgb needs a flow sampler"):
        load_sampler(config, torch.device("cpu"))

    def never_called(**kwargs):
        raise AssertionError("the loader was built before validation finished")

    with pytest.raises(ValueError, match="holds a rgb encoder; training rgb needs a flow sampler"):
        main(["--preset", "smoke", f"data.root={dataset}", f"run.out_dir={tmp_path / 'run'}", "stage.kind=cotrain",
              f"stage.sampler_checkpoint={config.stage.sampler_checkpoint}", "loss.queue_size=16",
              "run.progress=none"], build_loader=never_called)
    assert not (tmp_path / "run").exists()


def test_no_update_until_the_queue_is_full_then_mining(dataset, tmp_path):
    config = _cotrain_config(dataset, _sampler_checkpoint(tmp_path / "flow", "flow"), "loss.mining_topk=2")
    ctx = build_context(config, DistInfo(0, 0, 1, torch.device("cpu")))
    assert isinstance(ctx.sampler, FrozenSampler) and ctx.model.queue.cross_view
    loader = FakePretrainLoader(dataset, modalities=("rgb", "flow"), batch_size=4, frames_per_clip=8, crop_size=32)
    batches = loader.epoch(0)
    before = [p.clone() for p in ctx.model.query.parameters()]
    for step in range(2):  # queue 8 = 2 batches of 4: both steps only fill it
        values = read_terms([train_step(ctx, next(batches), 0, step)])[0]
        assert values["queue_full"] == 0.0 and math.isnan(values["mining_precision"])
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.query.parameters()))
    assert ctx.model.queue.is_full and (ctx.model.queue.label >= 0).all()
    values = read_terms([train_step(ctx, next(batches), 0, 2)])[0]
    assert values["queue_full"] == 1.0 and 0.0 <= values["mining_precision"] <= 1.0
    assert values["positives"] >= 1.0 + 2  # own key, two mined, plus any queued clip of the same group
    assert {"loss_local", "loss_temporal", "mining_chance", "top1_instance"} <= set(values)
    assert not all(torch.equal(a, b) for a, b in zip(before, ctx.model.query.parameters()))


def test_local_keys_belong_to_their_own_video(dataset, tmp_path, monkeypatch):
    """The authors' stage-2 code un-shuffled local keys it had never shuffled. Here they go through
    shuffle-BN: with BN in eval mode (no batch statistics) row b must be video b's own encoding."""
    import cvtcl.engine as engine

    config = _cotrain_config(dataset, _sampler_checkpoint(tmp_path / "flow", "flow"))
    ctx = build_context(config, DistInfo(0, 0, 1, torch.device("cpu")))
    ctx.model.eval()
    seen = {}
    real = engine.losses.local_temporal_loss

    def spy(z_local, k_local, tau):
        seen["k"] = k_local
        return real(z_local, k_local, tau)

    monkeypatch.setattr(engine.losses, "local_temporal_loss", spy)
    batch = next(FakePretrainLoader(dataset, modalities=("rgb", "flow"), batch_size=4, frames_per_clip=8,
                                    crop_size=32).epoch(0))
    _, z_local = engine.encode_queries(ctx, batch)
    engine.ltcl_step(ctx, batch, engine.StepDraws(ctx, [("perm", 16)], torch.Generator().manual_seed(3)), z_local)
    segments = engine.clip_segments(batch, "rgb", 4)[:, 1]  # [B, M, C, L, H, W], key copy
    with torch.no_grad():
        direct = torch.stack([ctx.model.key(segments[b]) for b in range(4)])  # [B, M, D], one video at a time
    torch.testing.assert_close(seen["k"], direct, rtol=1e-4, atol=1e-5)


def test_stage_config_of_each_sub_stage(tmp_path):
    base = apply_overrides(get_preset("ucf101-cvtcl"), [f"run.out_dir={tmp_path}"])
    stage1 = stage_config(base, StageRun(SubStage("stage1-flow", "flow"), tmp_path / "stage1-flow", None, None))
    assert (stage1.stage.kind, stage1.stage.modality, stage1.optim.epochs, stage1.optim.lr_milestones) == \
        ("instance", "flow", 300, (250, 280))
    assert stage1.schedule.cycles == 0 and stage1.run.out_dir == str(tmp_path / "stage1-flow")
    run = StageRun(SubStage("cycle1-flow", "flow", "stage1-flow", "cycle1-rgb"), tmp_path / "cycle1-flow",
                   tmp_path / "a.pt", tmp_path / "b.pt")
    flow = stage_config(base, run)
    assert (flow.stage.kind, flow.optim.epochs, flow.optim.lr_milestones, flow.optim.lr) == ("cotrain", 100, (80,), 1e-3)
    assert (flow.stage.init_checkpoint, flow.stage.sampler_checkpoint) == (str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert flow.loss.ltcl_weight == 0.0  # paper Table 2: no L_LTCL when flow mines from rgb
    rgb = stage_config(base, StageRun(SubStage("cycle1-rgb", "rgb", "x", "y"), tmp_path, tmp_path, tmp_path))
    assert rgb.loss.ltcl_weight == 1.0 and rgb.loss.mining_topk == 5 and rgb.loss.self_positive_drop == 0.9


def test_a_run_without_an_optimizer_step_is_never_complete(dataset, tmp_path, monkeypatch):
    """Were the refusal (tests/test_errors.py) bypassed, a co-training run that only fills its queue
    stops after its epochs but is not marked complete."""
    import cvtcl.preflight

    monkeypatch.setattr(cvtcl.preflight, "check_queue_fills", lambda *args: None)
    sampler = _sampler_checkpoint(tmp_path / "flow", "flow")
    args = ["--preset", "smoke", f"data.root={dataset}", f"run.out_dir={tmp_path / 'run'}", "stage.kind=cotrain",
            f"stage.sampler_checkpoint={sampler}", "loss.queue_size=16", "optim.epochs=1", "run.progress=none"]
    assert main(args, build_loader=FakePretrainLoader) == 0
    assert [r["queue_full"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0.0]
    assert not is_complete(tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Raise optim.epochs above 1 or lower loss.queue_size"):
        main(args, build_loader=FakePretrainLoader)


def _never_called(**kwargs):
    raise AssertionError("a loader was built: the command was not refused before any work")


def _schedule_args(dataset, out, *extra):
    return ["--preset", "smoke-cvtcl", f"data.root={dataset}", f"run.out_dir={out}", "loss.queue_size=8",
            "run.progress=plain", "run.keep_checkpoints=0", *extra]


def test_a_schedule_stopped_by_max_steps_says_to_raise_it(dataset, tmp_path, capsys):
    """A rerun of the same command would stop at once again: the line says which key ended it."""
    assert main(_schedule_args(dataset, tmp_path, "run.max_steps=1"), build_loader=FakePretrainLoader) == 0
    out = capsys.readouterr().out
    assert ("[schedule] stage1-rgb: stopped before its last epoch; run.max_steps=1 ended it: raise or drop "
            "run.max_steps, then rerun to go on") in out
    assert f"[schedule] stage1-rgb (1 of 6): training rgb in {tmp_path / 'stage1-rgb'}" in out  # where it stands


def test_a_moved_schedule_directory_resumes_a_co_training_sub_stage(dataset, tmp_path):
    """A sub-stage's init and sampler checkpoints are paths under the schedule's directory; moved
    (or named by another path), the same files are found there, and the sub-stage resumes. Before,
    the changed paths were a changed config and the run was refused."""
    assert main(_schedule_args(dataset, tmp_path / "run"), build_loader=FakePretrainLoader) == 0
    moved = (tmp_path / "run").rename(tmp_path / "moved")
    latest_checkpoint(moved / "cycle2-rgb").unlink()  # its last epoch to do again, from the new place
    assert not is_complete(moved / "cycle2-rgb")
    assert main(_schedule_args(dataset, moved), build_loader=FakePretrainLoader) == 0
    assert is_complete(moved / "cycle2-rgb")
    saved = json.loads((moved / "cycle2-rgb" / "config.json").read_text())["stage"]
    assert saved["init_checkpoint"] == str(latest_checkpoint(moved / "cycle1-rgb"))


def test_whole_schedule_in_one_command(dataset, tmp_path):
    assert main(_schedule_args(dataset, tmp_path), build_loader=FakePretrainLoader) == 0
    assert all(is_complete(tmp_path / name) for name in SUB_STAGES)
    saved = {name: json.loads((tmp_path / name / "config.json").read_text())["stage"] for name in SUB_STAGES}
    assert saved["cycle2-rgb"]["init_checkpoint"] == str(latest_checkpoint(tmp_path / "cycle1-rgb"))
    assert saved["cycle2-rgb"]["sampler_checkpoint"] == str(latest_checkpoint(tmp_path / "cycle1-flow"))
    assert saved["cycle1-flow"]["sampler_checkpoint"] == str(latest_checkpoint(tmp_path / "cycle1-rgb"))
    rgb, flow = read_metrics(tmp_path / "cycle1-rgb/metrics.jsonl"), read_metrics(tmp_path / "cycle1-flow/metrics.jsonl")
    assert rgb[0]["queue_full"] == 0.0 and "mining_precision" not in rgb[0]  # warm-up: nothing mined, not logged
    assert rgb[-1]["queue_full"] == 1.0 and 0.0 <= rgb[-1]["mining_precision"] <= 1.0
    assert "loss_temporal" in rgb[-1] and "loss_temporal" not in flow[-1]  # L_LTCL on for rgb, off for flow
    assert [r["lr"] for r in rgb] == [1e-3, 1e-3, 1e-4, 1e-4]  # 2 epochs of 4 steps, x0.1 from epoch 1
    # cycle1-rgb started from stage1-rgb's query weights in both encoders: its step-2 checkpoint is
    # still in the warm-up (no update; the EMA of equal weights changes nothing)
    trained = load_checkpoint(latest_checkpoint(tmp_path / "stage1-rgb"))["model"]
    warm = load_checkpoint(tmp_path / "cycle1-rgb/checkpoint-00000002.pt")["model"]
    names = [n[len("query."):] for n in trained if n.startswith("query.") and "running" not in n and "batches" not in n]
    assert names and all(torch.equal(trained[f"query.{n}"], warm[f"query.{n}"]) for n in names)
    for n in names:  # the key encoder went through two EMA steps of equal weights: equal up to rounding
        torch.testing.assert_close(warm[f"key.{n}"], trained[f"query.{n}"], rtol=1e-6, atol=1e-6)
    # another length for finished sub-stages: refused before any work (it skipped them and trained
    # the rest to the new length, silently)
    with pytest.raises(ValueError, match=r"cycle1-rgb finished 2 epochs \(lr milestones \[1\]\); this command asks 3 "
                                         r"\(\[1\]\) through schedule.cotrain_epochs"):
        main(_schedule_args(dataset, tmp_path, "schedule.cotrain_epochs=3"), build_loader=_never_called)
    with pytest.raises(ValueError, match=r"stage1-rgb finished 2 epochs .* asks 3 .* through optim.epochs"):
        main(_schedule_args(dataset, tmp_path, "optim.epochs=3"), build_loader=_never_called)
    # another dataset: the finished sub-stages were skipped and the rest trained on it, silently
    other = make_dataset(tmp_path / "other", num_videos=12)
    with pytest.raises(ValueError, match=r"stage1-rgb was trained on another dataset than data.root=.*other holds"):
        main(_schedule_args(other, tmp_path), build_loader=_never_called)


def test_a_stop_in_a_sub_stages_last_step_ends_the_schedule(dataset, tmp_path, monkeypatch, capsys):
    """A SIGTERM (or Ctrl-C) during a sub-stage's last step left it complete, and the schedule went
    on through every later sub-stage (hours at full size) after saying "rerun to resume"."""
    from cvtcl import engine

    real_step = engine.train_step

    def step(ctx, batch, epoch, epoch_step):
        last = epoch == ctx.config.optim.epochs - 1 and epoch_step == 3  # 16 videos, batch 4: 4 steps an epoch
        if last and Path(ctx.config.run.out_dir).name == "stage1-rgb":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(ctx, batch, epoch, epoch_step)

    monkeypatch.setattr(engine, "train_step", step)
    assert main(_schedule_args(dataset, tmp_path), build_loader=FakePretrainLoader) == 0
    assert is_complete(tmp_path / "stage1-rgb") and not (tmp_path / "stage1-flow").exists()
    assert "[schedule] stage1-rgb: complete; stopped before the next sub-stage; rerun the same command to resume" \
        in capsys.readouterr().out


def test_a_sub_stages_config_json_resumes_it_from_another_directory(dataset, tmp_path, monkeypatch):
    """A schedule started with a relative run.out_dir: its sub-stages' config.json named their init
    and sampler checkpoints relative to that directory, and did not resume from another one."""
    monkeypatch.chdir(tmp_path)
    assert main(_schedule_args(dataset, Path("sched")), build_loader=FakePretrainLoader) == 0
    stage = json.loads((tmp_path / "sched" / "cycle2-flow" / "config.json").read_text())["stage"]
    assert stage["init_checkpoint"] == str(latest_checkpoint(tmp_path / "sched" / "cycle1-flow"))
    assert stage["sampler_checkpoint"] == str(latest_checkpoint(tmp_path / "sched" / "cycle2-rgb"))
    latest_checkpoint(tmp_path / "sched" / "cycle2-flow").unlink()  # its last epoch to do again
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["--config", "../sched/cycle2-flow/config.json"], build_loader=FakePretrainLoader) == 0
    assert is_complete(tmp_path / "sched" / "cycle2-flow")


def test_stage_option_needs_a_schedule_and_its_dependencies(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage stage1-rgb"):
        main(_schedule_args(dataset, tmp_path, "--stage", "cycle1-rgb"), build_loader=FakePretrainLoader)
    with pytest.raises(ValueError, match="use a schedule preset"):
        main(["--preset", "smoke", "--stage", "stage1-rgb"], build_loader=FakePretrainLoader)
    with pytest.raises(ValueError, match="choose one of"):
        main(_schedule_args(dataset, tmp_path, "--stage", "cycle3-rgb"), build_loader=FakePretrainLoader)


@pytest.mark.multiprocess
def test_sigkill_inside_stage_two_then_rerun_finishes_every_sub_stage(synthetic_dataset, tmp_path):
    """The real command on the real (DALI CPU) loader and the packed synthetic shards: 6 train
    videos = 1 step per epoch; a 4-entry queue fills in one step, so stage 2 trains 3 of its 4."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "cvtcl.train", "--preset", "smoke-cvtcl", f"data.root={synthetic_dataset}",
               f"run.out_dir={tmp_path}", "loss.queue_size=4", "loss.mining_topk=2", "schedule.cotrain_epochs=4",
               "run.checkpoint_every=1", "run.keep_checkpoints=0", "run.progress=plain"]
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path / "cycle1-flow") is None:
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "timed out waiting for a stage-2 checkpoint"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not is_complete(tmp_path / "cycle1-flow") and latest_checkpoint(tmp_path / "cycle2-rgb") is None
    killed_at = load_checkpoint(latest_checkpoint(tmp_path / "cycle1-flow"))["step"]
    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "stage1-rgb: complete" in second.stdout and "resumed from" in second.stdout
    assert f"(step {killed_at}, " in second.stdout
    assert all(is_complete(tmp_path / name) for name in SUB_STAGES)
    last = read_metrics(tmp_path / "cycle2-rgb/metrics.jsonl")[-1]
    assert last["queue_full"] == 1.0 and 0.0 <= last["mining_precision"] <= 1.0
