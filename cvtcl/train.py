"""Training entry point: `python -m cvtcl.train` or `torchrun --nproc_per_node N -m cvtcl.train`.

    python -m cvtcl.train --preset ucf101-stage1-rgb data.root=/data/ucf101 run.out_dir=runs/rgb
    torchrun --nproc_per_node 8 -m cvtcl.train --preset ucf101-cvtcl data.root=/data/ucf101
    python -m cvtcl.train --preset ucf101-cvtcl --stage cycle1-rgb      # one sub-stage alone

A preset with `schedule.cycles > 0` runs the whole two-stage schedule (cvtcl/schedule.py): each
sub-stage is one ordinary run below in `run.out_dir/<sub-stage>/`; rerunning resumes it.

Reads top to bottom in execution order: parse the config, validate everything that can be
checked without work (cvtcl/preflight.py: config, world size vs queue, dataset files,
checkpoints), join the process group, build loader / model / optimizer, resume from the run
directory's latest checkpoint, then run epochs (cvtcl/engine.py) until done, `run.max_steps`,
SIGTERM (checkpoint, exit 0) or Ctrl-C (checkpoint, exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from cvtcl import distributed, provenance
from cvtcl.checkpoint import is_complete, latest_checkpoint, latest_loadable, load_encoder, save_checkpoint
from cvtcl.config import TrainConfig, apply_file, apply_overrides, describe, read_config_file
from cvtcl.cotrain import checkpoint_of, load_sampler, stage_config  # also registers STEPS["cotrain"]
from cvtcl.engine import (PRECISION, Context, StepTerms, amp_dtype, compile_encoders, memory_report,
                          peak_memory_gib, read_terms, train_one_epoch)
from cvtcl.errors import EXIT_INTERRUPTED, RunFailed, StopSignals, run_command
from cvtcl.metrics import MetricsLogger, Window, read_metrics
from cvtcl.models import Encoder
from cvtcl.preflight import check_dataset, check_same_dataset, epoch_steps, modalities, plan, validate
from cvtcl.retrieval import KnnMonitor
from cvtcl.moco import MomentumContrast
from cvtcl.presets import PRESETS, get_preset
from cvtcl.schedule import StageRun, check_queue_fills, cvtcl_schedule, run_schedule, select, warmup_steps
from dali_pipelines.iterate import LoaderFailed
from preprocess.hygiene import OutputDirError, exclusive_dir, remove_temporaries
from preprocess.schema import manifest_digest, write_json_atomic

# BN running statistics stay per rank (no broadcast each forward); rank 0's are checkpointed.
# torch 2.14 renamed the switch and warns at every run about the old name, which older torch
# (2.11 on the GPU machines lent to this project) has alone.
PER_RANK_BUFFERS = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else {"broadcast_buffers": False})


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, str | None]:
    """(config, --stage NAME or None): the preset, then --config FILE, then key=value overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m cvtcl.train",
        description="CVTCL training (one process, or one per GPU under torchrun).",
        epilog="overrides: section.field=value, e.g. optim.lr=5e-4 data.root=/data/ucf101 (--help-config lists them)",
    )
    parser.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of sections and keys (a run's config.json works as is), "
                             "applied over the preset (or the defaults without --preset)")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its value (after --preset, --config, overrides) and reason")
    parser.add_argument("--stage", help="with a schedule preset (e.g. ucf101-cvtcl): run this sub-stage only")
    parser.add_argument("--plan", action="store_true",
                        help="print each sub-stage's epochs, steps and clips at this many processes (WORLD_SIZE), "
                             "check the dataset, and exit without training")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # intermixed: overrides may come on both sides of an option (`… a=1 --stage cycle1-rgb b=2`)
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if not (args.preset or args.config or args.help_config):
        parser.error("give --preset NAME or --config FILE (or both: the file's keys override the preset's)")
    config = get_preset(args.preset) if args.preset else TrainConfig()
    if args.config:
        config = apply_file(config, read_config_file(args.config), f"--config {args.config}")
    config = apply_overrides(config, args.overrides)
    if args.help_config:
        print(describe(config))
        raise SystemExit(0)
    config = located(config, args.config, args.overrides)
    if args.stage and not config.schedule.cycles:
        raise ValueError(f"--stage {args.stage}: this config runs one stage (schedule.cycles=0); "
                         "use a schedule preset such as ucf101-cvtcl or smoke-cvtcl")
    if args.plan:
        print(plan(config, distributed.env_world()[2], sub_stages(config, args.stage)))
        raise SystemExit(0)
    return config, args.stage


def located(config: TrainConfig, config_file: str | None, overrides: list[str]) -> TrainConfig:
    """The config with the paths it reads made absolute, so that the run's config.json and
    checkpoints name them from any working directory; and when `config_file` is a run's own
    config.json (its folder holds the run's metrics or checkpoints) and no run.out_dir override is
    given, run.out_dir is that folder: `--config RUN/config.json` resumes RUN from anywhere, moved
    or not. (run.out_dir itself is kept as given: the messages name it so.)"""
    data = config.to_dict()
    for section, key in (("data", "root"), ("stage", "init_checkpoint"), ("stage", "sampler_checkpoint")):
        if data[section][key]:
            data[section][key] = os.path.abspath(data[section][key])
    folder = Path(config_file).parent if config_file and Path(config_file).name == "config.json" else None
    if folder is not None and not any(item.partition("=")[0].strip() == "run.out_dir" for item in overrides) and (
            (folder / "metrics.jsonl").exists() or any(folder.glob("checkpoint-*.pt"))):
        data["run"]["out_dir"] = str(folder)
    return TrainConfig.from_dict(data)


def sub_stages(config: TrainConfig, only: str | None = None) -> list[tuple[str, TrainConfig]]:
    """(name, config) of every run the command would make: the schedule's sub-stages (`only`: one
    of them), or the one run. Dependencies are named by their run directories, which need not
    exist yet."""
    if not config.schedule.cycles:
        return [(Path(config.run.out_dir).name or "run", config)]
    root = Path(config.run.out_dir)
    return [(stage.name, stage_config(config, StageRun(stage, root / stage.name,
                                                        stage.init and root / stage.init,
                                                        stage.sampler and root / stage.sampler)))
            for stage in select(cvtcl_schedule(config.schedule.cycles), only)]


def check_finished_sub_stages(config: TrainConfig) -> None:
    """A finished sub-stage is skipped and the later ones build on it: asked for another length now
    (schedule.cotrain_epochs, optim.epochs or their milestones), the schedule kept it as it was and
    trained the rest to the new length, sub-stages of unequal lengths without a word."""
    root = Path(config.run.out_dir)
    for name, derived in sub_stages(config):
        _, state = latest_loadable(root / name, mmap=True)  # a flag and the config: nothing else read
        if state is None or not state.get("complete"):
            continue
        check_same_dataset(derived, state, root / name)  # the sub-stages after it would train on another
        done, asked = state["config"]["optim"], derived.optim
        if (done["epochs"], list(done["lr_milestones"])) != (asked.epochs, list(asked.lr_milestones)):
            keys = ("schedule.cotrain_epochs / schedule.cotrain_lr_milestones" if derived.stage.kind == "cotrain"
                    else "optim.epochs / optim.lr_milestones")
            raise ValueError(
                f"{root / name} finished {done['epochs']} epochs (lr milestones {list(done['lr_milestones'])}); this "
                f"command asks {asked.epochs} ({list(asked.lr_milestones)}) through {keys}, and the sub-stages "
                f"after it build on it: give {keys} as before, or train the schedule anew in another run.out_dir")


def build_context(config: TrainConfig, dist: distributed.DistInfo) -> Context:
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank, and across reruns
    encoder = Encoder(config.stage.modality, config.model.backbone, config.model.embed_dim, config.model.channels_last_3d)
    cotrain = config.stage.kind == "cotrain"
    model = MomentumContrast(encoder, config.loss.queue_size, config.loss.bn_groups, cross_view=cotrain).to(dist.device)
    if config.stage.init_checkpoint:
        weights, _ = load_encoder(config.stage.init_checkpoint, map_location=dist.device)
        model.query.load_state_dict(weights.state_dict())
        model.copy_query_to_key()
    compile_encoders(model, config.run.compile, dist.device, dist.world_size)
    query = model.query
    if dist.world_size > 1:
        query = DistributedDataParallel(query, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                                        **PER_RANK_BUFFERS)
    # fused off the CPU: one kernel for every tensor, and it skips a non-finite step on the device;
    # capturable: its step counts stay on the GPU, so a CUDA graph can hold it (run.compile=graph|step)
    optimizer = torch.optim.Adam(model.query.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                 fused=dist.device.type != "cpu",
                                 capturable=config.run.captures_step and dist.device.type == "cuda")
    dtype = amp_dtype(config.optim.amp, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    sampler = load_sampler(config, dist.device) if cotrain else None
    return Context(config, model, query, optimizer, scaler, dist.device, dtype, sampler=sampler, rank=dist.rank)


def loader_arguments(config: TrainConfig, dist: distributed.DistInfo) -> dict[str, Any]:
    """Keyword arguments of cvtcl.data.build_pretrain_loader (the interface in the project brief)."""
    data = config.data
    return dict(
        root=data.root, split=data.split, subset=data.subset, modalities=modalities(config),
        batch_size=data.batch_size, frames_per_clip=data.frames_per_clip, frame_stride=data.frame_stride,
        crop_size=data.crop_size, pair_mode=data.pair_mode, segments=data.segments, augment=data.augment,
        num_segments=data.num_segments, seed=config.run.seed, rank=dist.rank, world_size=dist.world_size,
        device=dist.device.type, device_id=dist.device_id, num_threads=data.num_threads, backend=data.backend,
        dtype=torch.float32, crop_scale_min=data.crop_scale_min,
    )


def knn_monitor(config: TrainConfig, dist: distributed.DistInfo) -> KnnMonitor:
    """The retrieval check of paper Fig. 3 on the trained modality: test queries, train gallery,
    centre crop, non-overlapping windows (stride = frames_per_clip: half the evaluation's cost)."""
    data = config.data
    return KnnMonitor.from_dataset(
        data.root, config.stage.modality, split=data.split, window_stride=data.frames_per_clip, device=dist.device,
        frames_per_clip=data.frames_per_clip, crop_size=data.crop_size, batch_size=data.batch_size,
        num_threads=data.num_threads, backend=data.backend,
    )


def nothing_to_do(config: TrainConfig, world_size: int) -> str | None:
    """What to say when run.out_dir's run is complete and this config asks no step more of it (a
    rerun of a finished run, or one with optim.epochs lowered); None when there is work."""
    _, state = latest_loadable(config.run.out_dir, mmap=True)  # a flag and the config: nothing else read
    if state is None or not state.get("complete"):
        return None
    total = config.optim.epochs * epoch_steps(config, world_size)
    if state["step"] < (min(total, config.run.max_steps) if config.run.max_steps else total):
        return None
    return (f"{config.run.out_dir} is complete (step {state['step']}, optim.epochs={state['config']['optim']['epochs']}): "
            "nothing to do; raise optim.epochs to train longer")


def checkpoint_state(ctx: Context, epoch: int, epoch_step: int, complete: bool) -> dict[str, Any]:
    return {
        "step": ctx.step, "epoch": epoch, "epoch_step": epoch_step,
        "model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(), "encoder": ctx.model.query.config(), "config": ctx.config.to_dict(),
        "complete": complete, "world_size": distributed.world_size(),
    }


def run_dir_lock(out_dir: str | Path):
    """One writer per run directory: rank 0 holds `out_dir/.lock` for the run (preprocess/hygiene.py);
    a second training on it stops with OutputDirError (exit 2). Other ranks share rank 0's."""
    rank, _, _ = distributed.env_world()
    if rank != 0:
        return contextlib.nullcontext()
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"run.out_dir={out_dir}: cannot create it ({err.strerror}); "
                              "choose a writable run.out_dir") from None
    return exclusive_dir(out_dir, "cvtcl.train run")


def main(argv: list[str] | None = None, build_loader: Callable[..., Any] | None = None) -> int:
    """Train one run or the whole schedule; 0 when done or stopped by SIGTERM, 130 after Ctrl-C."""
    config, only = parse_config(argv)
    stopped_by: list[int | None] = []
    if not config.schedule.cycles:
        stopped_by.append(train(config, build_loader))
    else:
        rank, _, world_size = distributed.env_world()
        global_batch = config.data.batch_size * world_size
        check_dataset(config, ("rgb", "flow"), global_batch)
        check_queue_fills(config.loss.queue_size, global_batch, epoch_steps(config, world_size),
                          config.schedule.cotrain_epochs, "schedule.cotrain_epochs", config.loss.mining_topk)
        check_finished_sub_stages(config)
        def run_one(run: StageRun) -> bool:
            """Train one sub-stage; whether a stop was asked for in it, which ends the schedule after
            it. Under torchrun the ranks agree on a stop at log steps only, so one asked for in the
            last steps may have reached some of them: they go on, as they agree, to the next."""
            stopped_by.append(train(stage_config(config, run), build_loader))
            return stopped_by[-1] is not None and world_size == 1

        with run_dir_lock(config.run.out_dir):
            run_schedule(
                cvtcl_schedule(config.schedule.cycles), Path(config.run.out_dir),
                run_one=run_one,
                is_complete=is_complete, final_checkpoint=checkpoint_of, only=only,
                log=lambda text: print(text, flush=True) if rank == 0 and config.run.progress != "none" else None,
                # a rerun with the same run.max_steps would stop at once again
                resume_advice=lambda: "rerun the same command to resume" if stopped_by[-1] is not None or
                not config.run.max_steps else f"run.max_steps={config.run.max_steps} ended it: raise or drop "
                "run.max_steps, then rerun to go on",
            )
    distributed.shutdown()
    return EXIT_INTERRUPTED if signal.SIGINT in stopped_by else 0


def train(config: TrainConfig, build_loader: Callable[..., Any] | None = None) -> int | None:
    """One run of the training loop: validate (creating nothing), then under run.out_dir's lock
    build, resume from run.out_dir, train, checkpoint. Returns the signal that stopped it early
    (SIGTERM, SIGINT), or None."""
    _, _, world_size = distributed.env_world()
    validate(config, world_size)
    with run_dir_lock(config.run.out_dir):
        # Joined before the handlers are in place: a SIGTERM while this rank waits for the others
        # (torchrun's, after another rank stopped, e.g. at a busy run.out_dir) ends it at once
        # instead of leaving it blocked until torchrun's grace of 30 s runs out; nothing is lost.
        dist = distributed.init(config.run.device)
        with StopSignals() as stop_signals:
            _train(config, dist, build_loader, stop_signals)
    return stop_signals.received


def _train(config: TrainConfig, dist: distributed.DistInfo, build_loader: Callable[..., Any] | None,
           stop_signals: StopSignals) -> None:
    torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune the 3D convolutions once
    run_dir = Path(config.run.out_dir)
    done = nothing_to_do(config, dist.world_size)
    if done:  # before config.json: it keeps saying what was trained
        if dist.is_main and config.run.progress != "none":
            print(done, flush=True)
        return
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"run.out_dir={run_dir}: cannot create it ({err.strerror}); "
                                  "choose a writable run.out_dir") from None
        remove_temporaries(run_dir, ("checkpoint-*.pt*.tmp", "metrics.jsonl.tmp"))  # a killed run's
        try:
            write_json_atomic(run_dir / "config.json", config.to_dict())
        except OSError as err:  # a full disk: one line (exit 2), not a traceback
            raise OutputDirError(f"cannot write {run_dir / 'config.json'} ({err.strerror}); free space") from None

    if build_loader is None:
        from cvtcl.data import build_pretrain_loader as build_loader  # DALI is imported only here
    loader = build_loader(**loader_arguments(config, dist))
    ctx = build_context(config, dist)

    epoch, epoch_step = 0, 0
    skipped = []  # newer checkpoints that do not load, named once the logger exists
    latest, state = latest_loadable(run_dir, map_location=dist.device, log=skipped.append)
    if latest is not None:
        ctx.model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.scaler.load_state_dict(state["scaler"])
        ctx.step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]

    steps_per_epoch = loader.steps_per_epoch
    epochs_total = config.optim.epochs * steps_per_epoch  # "complete" = every epoch trained
    # ... and at least one optimizer step taken (stage 2 trains nothing while its queue fills)
    trained = config.stage.kind != "cotrain" or (
        epochs_total > warmup_steps(config.loss.queue_size, config.data.batch_size * dist.world_size))
    total = epochs_total
    if config.run.max_steps:
        total = min(total, config.run.max_steps)
    logger = MetricsLogger(run_dir, dist.is_main, config.run.progress, total, ctx.step)
    if dist.is_main:
        launch = provenance.launch_record(
            stage=f"{'stage 1' if config.stage.kind == 'instance' else 'co-training'} {config.stage.modality}",
            world_size=dist.world_size, device=dist.device, precision=PRECISION[ctx.autocast_dtype],
            compile_mode=config.run.compile, batch_size=config.data.batch_size,
            resumed_from=ctx.step if latest is not None else None, total_steps=total)
        provenance.record_launch(run_dir, launch)
        logger.message(provenance.summary(launch))
    for text in skipped:
        logger.message(f"{text}: skipped, resuming from an older one")
    if latest is not None:
        logger.message(f"resumed from {latest} (step {ctx.step}, epoch {epoch}, batch {epoch_step})")

    # the steps since the last log line before the checkpoint: the first line after a resume
    # averages the same steps as an uninterrupted run's
    window = Window.from_state(state.get("metrics_window") if state else None)
    global_batch = config.data.batch_size * dist.world_size

    monitor = knn_monitor(config, dist) if config.run.knn_every else None

    dataset = manifest_digest(config.data.root)  # a resume may read a copy of it elsewhere (preflight)
    pending: list[tuple[StepTerms, float, float]] = []  # steps whose terms are still on the device
    graph_failure_said = False  # a failed CUDA graph capture is said once, by the rank it failed on

    def absorb() -> None:
        """Read the pending steps' terms (one device read; raises on a non-finite loss) into the window."""
        started = time.perf_counter()
        for values, (_, data_s, compute_s) in zip(read_terms([p[0] for p in pending]), pending):
            window.add(values, data_s, compute_s)
        window.compute_seconds += time.perf_counter() - started  # the host waited for the GPU to catch up
        pending.clear()

    saved = {"step": ctx.step if latest is not None else None, "position": (epoch, epoch_step)}

    def write_checkpoint(epoch: int, epoch_step: int, complete: bool, window_state) -> None:
        """Rank 0 writes the checkpoint (with the metrics window since the last line); all wait."""
        if dist.is_main:
            save_checkpoint(run_dir, {**checkpoint_state(ctx, epoch, epoch_step, complete=complete),
                                      "metrics_window": window_state, "dataset": dataset},
                            config.run.keep_checkpoints)
        distributed.barrier()
        saved["step"] = ctx.step

    def checkpoint_step(position: tuple[int, int]) -> None:
        """The checkpoint of the step just done, at `position` (epoch, batch) of the next one."""
        absorb()  # a checkpoint never holds a non-finite step
        window_state = window.state_dict(lambda sums: distributed.all_reduce_mean(sums, dist.device))
        write_checkpoint(*position, ctx.step >= epochs_total and trained, window_state)

    def on_step(epoch: int, epoch_step: int, terms: StepTerms, data_s: float, compute_s: float) -> bool:
        nonlocal window, graph_failure_said
        pending.append((terms, data_s, compute_s))
        if ctx.graph is not None and ctx.graph.error is not None and not graph_failure_said:
            graph_failure_said = True
            where = f"rank {dist.rank}: " if dist.world_size > 1 else ""
            logger.warn(f"{where}run.compile={config.run.compile}: the CUDA graph capture failed at step {ctx.step} "
                        f"({ctx.graph.error}); training goes on with the eager step, slower")
        logger.tick(ctx.step)
        position = (epoch, epoch_step) if epoch_step < steps_per_epoch else (epoch + 1, 0)
        saved["position"] = position
        log_step = ctx.step % config.run.log_every == 0 or ctx.step == total
        if log_step:
            absorb()
            means = distributed.all_reduce_mean(window.means(), dist.device)
            seconds = window.data_seconds + window.compute_seconds
            logger.log({
                "step": ctx.step, "epoch": epoch, **means, "lr": ctx.optimizer.param_groups[0]["lr"],
                "clips_per_s": global_batch * window.steps / seconds,
                "data_s": window.data_seconds / window.steps, "compute_s": window.compute_seconds / window.steps,
                "data_wait_fraction": window.data_seconds / seconds, "peak_memory_gib": peak_memory_gib(dist.device),
            })
            if ctx.step % config.run.log_every == 0:
                # a line at the run's last step only (run.max_steps) keeps its window for the
                # checkpoint: a resumed run's next line averages what an uninterrupted run's does
                window = Window()
        # One process reads its own flag; under torchrun the ranks agree on it at log steps only
        # (a collective every step would make each step wait for the others and the GPU).
        asked = stop_signals.received is not None
        stop = asked if dist.world_size == 1 else log_step and distributed.broadcast_flag(asked, dist.device)
        finished = ctx.step >= total
        if stop or finished or ctx.step % config.run.checkpoint_every == 0 or epoch_step == steps_per_epoch:
            checkpoint_step(position)
        if monitor is not None and epoch_step == steps_per_epoch and (epoch + 1) % config.run.knn_every == 0:
            run_monitor(epoch)
        if stop:
            logger.message(f"{stop_signals.describe()}: checkpoint saved at step {ctx.step}; "
                           "rerun the same command to resume")
        return stop or finished

    def run_monitor(epoch: int) -> None:
        """The kNN monitor after `epoch`, its line in metrics.jsonl (rank 0; the others wait)."""
        if dist.is_main:
            logger.show("kNN monitor: retrieval of the test split ...")
            logger.log({"step": ctx.step, "epoch": epoch, **monitor(ctx.model.query)})
        distributed.barrier()

    if monitor is not None and latest is not None and epoch_step == 0 and 0 < epoch and epoch % config.run.knn_every == 0:
        # the run may have stopped between the epoch's checkpoint and its kNN line (a kill, torchrun's
        # grace): rank 0's metrics.jsonl says, for every rank
        missing = dist.is_main and not any(key.startswith("knn/") for r in read_metrics(run_dir / "metrics.jsonl")
                                           if r["step"] == ctx.step for key in r)
        if distributed.broadcast_flag(missing, dist.device):  # only rank 0 may say True
            run_monitor(epoch - 1)
    if latest is not None and ctx.step >= epochs_total and trained and not state.get("complete"):
        # optim.epochs lowered to where the run already stands: every epoch it asks for is trained
        write_checkpoint(epoch, epoch_step, True, state.get("metrics_window"))
        logger.message(f"step {ctx.step} is at or past the end of optim.epochs={config.optim.epochs} "
                       f"({epochs_total} steps): the run is complete")
    try:
        while ctx.step < total:
            batches = loader.epoch(epoch, epoch_step)
            if train_one_epoch(ctx, batches, epoch, epoch_step, on_step):
                break
            epoch, epoch_step = epoch + 1, 0
        if stop_signals.received is None and ctx.step <= total:  # a signal's own line said where it stopped
            logger.message(f"stopped at step {ctx.step} of {total}; checkpoints in {run_dir}")
    except torch.OutOfMemoryError:
        raise out_of_memory(config, ctx, dist.world_size, run_dir) from None
    except (LoaderFailed, RuntimeError) as err:  # torch's SIGCHLD handler raises a DataLoader worker's death anywhere
        from cvtcl.data import loader_failure

        died = err if isinstance(err, LoaderFailed) else loader_failure(f"step {ctx.step}", str(err))
        if died is None:
            raise
        if stop_signals.received is None:
            if died is err:
                raise
            raise died from err
        # The stop's signal ended the loader's workers too: SLURM and systemd signal every process
        # of the job at once. Waiting for a batch, every step is whole: checkpointed as any stop.
        if ctx.fetching and dist.world_size == 1:
            if saved["step"] != ctx.step:
                checkpoint_step(saved["position"])
            logger.message(f"{stop_signals.describe()}: checkpoint saved at step {ctx.step}; "
                           "rerun the same command to resume")
            return
        kept = f"step {saved['step']}" if saved["step"] is not None else "none yet"
        raise RunFailed(f"{stop_signals.describe()} ended the loader's workers too, at step {ctx.step + 1}: "
                        f"its last checkpoint ({kept}) is where the same command, rerun, resumes") from err
    finally:
        logger.close()


def out_of_memory(config: TrainConfig, ctx: Context, world_size: int, run_dir: Path) -> RunFailed:
    """The step (or the kNN monitor) ran out of device memory: one line with the memory figures and
    the keys that lower it. The batch cannot change within a run, so with checkpoints already
    written it takes a new run directory."""
    batch, queue = config.data.batch_size, config.loss.queue_size
    advice = [f"lower data.batch_size (loss.queue_size={queue} must stay a multiple of it x {world_size} "
              f"process{'es' if world_size > 1 else ''})"]
    if ctx.device.type == "cuda" and ctx.autocast_dtype is None:
        advice.append("train in bf16/fp16 (optim.amp=auto; S3D at batch 16 took 4.4 instead of 7.2 GiB on an H100)")
    if latest_checkpoint(run_dir) is not None:
        advice.append(f"in a new run.out_dir ({run_dir} has checkpoints of this batch size)")
    return RunFailed(f"out of {ctx.device.type} memory after {ctx.step} steps with data.batch_size={batch} "
                     f"({memory_report(ctx.device)}): " + ", ".join(advice))


def cli(argv: list[str] | None = None, build_loader: Callable[..., Any] | None = None) -> int:
    """`python -m cvtcl.train`: expected errors as one line (cvtcl/errors.py); exit 2 for bad input,
    1 when training failed (non-finite loss), 130 after Ctrl-C."""
    return run_command("cvtcl.train", lambda args: main(args, build_loader), argv)


if __name__ == "__main__":
    sys.exit(cli())
