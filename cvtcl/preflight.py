"""Everything a training run checks before it does any work (no process group, loader, model or
output directory exists yet): the config against the world size, the device, the output
directory, the dataset's files, splits and modalities, the stage's checkpoints, and whether the
run directory's latest checkpoint can be resumed with this config. Each failure names the key or
file and says what to do (cvtcl/errors.py turns it into one line and an exit status).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cvtcl import distributed
from cvtcl.checkpoint import CheckpointLoadError, latest_loadable, load_checkpoint
from cvtcl.config import TrainConfig
from cvtcl.cotrain import check_sampler  # also registers STEPS["cotrain"]
from cvtcl.data import dali_installed
from cvtcl.engine import STEPS, amp_dtype
from cvtcl.errors import UsageError, brief
from cvtcl.models import fewest_batch_norm_values
from cvtcl.moco import check_queue_size
from cvtcl.retrieval import too_few_to_centre
from cvtcl.schedule import check_queue_fills
from preprocess.schema import check_not_being_written, load_manifest, manifest_digest, shard_name
from preprocess.shards import check_shard_index

# Keys that may differ between a run and its resumption: they change when or how much is run or
# logged, not what is computed; run.out_dir is where the run is found (a moved or copied run
# directory resumes), run.expect_world_size a launch check (the world size itself is compared
# on its own). Anything else needs a new run.out_dir.
RESUMABLE_CHANGES = {
    "run.max_steps", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.progress",
    "optim.epochs", "data.num_threads", "run.device", "run.knn_every", "run.compile", "run.graph_scope",
    "run.legacy_step", "run.out_dir", "run.expect_world_size",
}


def check_dataset(config: TrainConfig, modalities: tuple[str, ...], global_batch: int) -> None:
    """The dataset exists, is complete, has the modalities and enough videos for one global batch,
    and the index of every shard the run reads is the one the manifest recorded. The loaders check
    each index again as they open a shard, but by then the run has written its config and logs;
    reading the indexes here (12 bytes per frame and flow plane, and the HDF5 metadata; crc32 runs
    at GB/s) makes a damaged one an error found before any work (exit 2, nothing written)."""
    root = Path(config.data.root)
    check_not_being_written(root)
    manifest = load_manifest(root)
    missing = [s["file"] for s in manifest.shards if not (root / s["file"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} shard(s) listed in manifest.json are missing (first: {missing[0]}); "
            "copy the whole dataset directory or re-run cvtcl-preprocess"
        )
    if "flow" in modalities and not manifest.has_flow:
        raise ValueError(f"{root} was preprocessed without flow; re-run cvtcl-preprocess with a flow backend")
    split = manifest.splits.get(config.data.split, {})
    videos = split.get(config.data.subset)
    if videos is None:
        raise KeyError(f"{root}: no split {config.data.split!r} subset {config.data.subset!r}; set data.split/data.subset")
    if not videos:  # e.g. Kinetics' official test subset: its rows have no labels, nothing is packed
        there = "; ".join(f"{k}: {', '.join(f'{s} ({len(n)})' for s, n in v.items())}" for k, v in manifest.splits.items())
        raise ValueError(f"{root}: split {config.data.split} subset {config.data.subset} has no videos; choose another "
                         f"data.split / data.subset (there: {there})")
    if len(videos) < global_batch:
        raise ValueError(
            f"{root}: split {config.data.split} {config.data.subset} has {len(videos)} videos, fewer than one "
            f"global batch ({global_batch}); lower data.batch_size"
        )
    read = set(videos)
    if config.run.knn_every:  # the kNN monitor queries with the test subset
        read.update(split.get("test", ()))
        why = too_few_to_centre(len(split.get("test", ())), len(split.get("train", ())))
        if why is not None:
            raise ValueError(f"run.knn_every={config.run.knn_every}: split {config.data.split} of {root} has {why}; "
                             "set run.knn_every=0")
    if "flow" in modalities:
        manifest.check_flow_frames(read, root)
    advice = f"run `cvtcl-preprocess verify {root}` and re-run preprocessing"
    for shard in sorted({v.shard for v in manifest.videos if v.name in read}):
        check_shard_index(manifest, root, root / shard_name(shard), advice)


def check_layout(config: TrainConfig, world_size: int) -> None:
    """The config against the number of processes: what `--plan` checks too."""
    if config.run.expect_world_size and world_size != config.run.expect_world_size:
        raise ValueError(
            f"this preset is laid out for {config.run.expect_world_size} processes, got WORLD_SIZE={world_size}; "
            f"launch torchrun with {config.run.expect_world_size} processes in total or set run.expect_world_size=0"
        )
    if world_size > 1 and config.run.graph_scope == "step" and config.run.captures_step:
        raise ValueError(f"run.graph_scope=step captures the whole step, which under torchrun (WORLD_SIZE={world_size}) "
                         "would hold its collectives: use run.graph_scope=auto, which graphs each encoder call there")
    if world_size == 1 and config.loss.bn_groups > config.data.batch_size:  # chunks would make fewer groups
        raise ValueError(f"loss.bn_groups={config.loss.bn_groups} is more than data.batch_size={config.data.batch_size}: "
                         "one process splits its keys into that many shuffle-BN groups of at least one clip each; "
                         "lower loss.bn_groups")
    if world_size == 1 and config.data.batch_size % config.loss.bn_groups:  # chunks: fewer or uneven groups
        raise ValueError(f"loss.bn_groups={config.loss.bn_groups} does not divide data.batch_size="
                         f"{config.data.batch_size}: one process splits its keys into that many shuffle-BN groups "
                         "of equal size; choose a divisor of the batch")
    if world_size == 1 and config.data.batch_size == config.loss.bn_groups:  # a shuffle-BN group of one clip
        data, backbone = config.data, config.model.backbone
        if fewest_batch_norm_values(backbone, config.stage.modality, data.frames_per_clip, data.crop_size) == 1:
            raise ValueError(
                f"data.batch_size={data.batch_size} in loss.bn_groups={config.loss.bn_groups} groups puts one clip in "
                f"each key-encoder BN group, and {backbone}'s deepest BatchNorm sees a single value per channel of a "
                f"{data.frames_per_clip}x{data.crop_size}x{data.crop_size} clip: no batch statistics. Raise "
                "data.batch_size (2 clips per group), or data.crop_size / data.frames_per_clip")
    check_queue_size(config.loss.queue_size, config.data.batch_size * world_size)
    if config.run.knn_every and config.data.frame_stride != 1:  # its windows are consecutive frames
        raise ValueError(f"run.knn_every={config.run.knn_every} with data.frame_stride={config.data.frame_stride}: the "
                         "kNN monitor (as cvtcl.eval) reads consecutive frames; set run.knn_every=0 or "
                         "data.frame_stride=1")


def check_backend(backend: str, asked: str, other: str) -> None:
    """The DALI loader is installed when it is asked for (hardware.md's legacy installs lack it)."""
    if backend == "dali" and not dali_installed():
        raise UsageError(f"{asked} needs the nvidia-dali-cuda130 package, which is not installed here (pip install "
                         f"nvidia-dali-cuda130; it runs without a GPU too), or use {other}")


def validate(config: TrainConfig, world_size: int) -> None:
    """Every check that needs no work, before any process group, loader or model exists."""
    check_layout(config, world_size)
    check_backend(config.data.backend, "data.backend=dali", "data.backend=baseline")
    global_batch = config.data.batch_size * world_size
    check_device(config)
    check_out_dir(config.run.out_dir)
    if config.stage.kind not in STEPS:
        raise NotImplementedError(f"stage.kind={config.stage.kind!r} has no step function in cvtcl/engine.py STEPS")
    check_stage_checkpoints(config)
    check_dataset(config, modalities(config), global_batch)
    if config.stage.kind == "cotrain":
        check_queue_fills(config.loss.queue_size, global_batch, epoch_steps(config, world_size),
                          config.optim.epochs, "optim.epochs", config.loss.mining_topk)
    skipped = []
    latest, state = latest_loadable(config.run.out_dir, log=skipped.append)
    if latest is not None:
        check_resumable(config, world_size, state, latest)
    elif skipped:  # starting over would overwrite their history: the user decides
        raise ValueError(f"no checkpoint in {config.run.out_dir} loads ({skipped[0]}); move them away to start "
                         "the run over, or use a new run.out_dir")


def check_stage_checkpoints(config: TrainConfig) -> None:
    """stage.sampler_checkpoint and stage.init_checkpoint are checkpoints of cvtcl.train (read with
    their tensors left in the file), and the sampler suits the stage: found here, not once the run
    has written its config and logs."""
    for name in ("sampler_checkpoint", "init_checkpoint"):
        path = getattr(config.stage, name)
        if not path:
            continue
        if not Path(path).is_file():
            what = "is a directory; give one of its checkpoint-*.pt files" if Path(path).is_dir() else "does not exist"
            raise FileNotFoundError(f"stage.{name}={path} {what}")
        try:
            encoder = load_checkpoint(path, mmap=True)["encoder"]
        except (CheckpointLoadError, ValueError, KeyError) as err:
            reason = getattr(err, "reason", None) or brief(err)
            raise ValueError(f"stage.{name}={path}: not a checkpoint of cvtcl.train ({reason}); "
                             "give a checkpoint-*.pt file of a training run") from None
        if name == "sampler_checkpoint":
            check_sampler(encoder, config)
        else:  # its weights start this run's encoder: the same architecture
            wanted = {"modality": config.stage.modality, "backbone": config.model.backbone,
                      "embed_dim": config.model.embed_dim}
            differ = [f"{key} {encoder.get(key)} (this run: {value})" for key, value in wanted.items()
                      if encoder.get(key) != value]
            if differ:
                raise ValueError(f"stage.init_checkpoint={path} holds another encoder: {', '.join(differ)}; give a "
                                 "checkpoint of this modality and model, or change stage.modality / model.*")


def check_device(config: TrainConfig) -> None:
    """run.device names a device this machine has, and optim.amp suits it (before any process group
    or loader exists)."""
    _, local_rank, _ = distributed.env_world()
    try:
        device = distributed.resolve_device(config.run.device.split(":")[0], local_rank)
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    if device.type == "cpu":  # on a GPU, asking for its capability would initialise CUDA here
        amp_dtype(config.optim.amp, device)


def check_out_dir(out_dir: str) -> None:
    """run.out_dir is a directory, or can become one (it is created only once the checks pass)."""
    path = Path(out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())  # ends at "." or "/"
    if not existing.is_dir():
        raise NotADirectoryError(f"run.out_dir={out_dir}: {existing} is a file, not a directory; "
                                 "choose another run.out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"run.out_dir={out_dir}: {existing} is not writable; choose another run.out_dir")


def epoch_steps(config: TrainConfig, world_size: int) -> int:
    """Steps per epoch as the loader will have them: the split's videos over the global batch."""
    videos = load_manifest(config.data.root).splits[config.data.split][config.data.subset]
    return len(videos) // world_size // config.data.batch_size


def modalities(config: TrainConfig) -> tuple[str, ...]:
    if config.stage.kind == "instance":
        return (config.stage.modality,)
    return (config.stage.modality, config.stage.sampler_modality)


def check_resumable(config: TrainConfig, world_size: int, state: dict[str, Any], path: Path) -> None:
    """The run directory's checkpoint was written by this config and this many processes."""
    if state.get("world_size", world_size) != world_size:
        raise ValueError(
            f"{path} was written by {_processes(state['world_size'])}, this run has {world_size}: the data order "
            "(each process reads its own part of an epoch) and the global batch would change mid-run. Relaunch "
            "with the same number of processes"
        )
    check_same_dataset(config, state, path)
    saved, current, defaults = state["config"], config.to_dict(), TrainConfig().to_dict()
    changed = [
        f"{section}.{key}"
        for section, values in current.items()
        for key, value in values.items()
        # a key the saved config lacks came with a later version: the run had its default's behaviour
        if saved.get(section, {}).get(key, defaults[section][key]) != value
        and f"{section}.{key}" not in RESUMABLE_CHANGES
        and not _same_source(saved, current, section, key, state.get("dataset"))
    ]
    if changed:
        raise ValueError(
            f"{path} was written with a different config ({', '.join(changed)}); resuming would mix two runs. "
            "Use a new run.out_dir, or restore those values"
        )


def check_same_dataset(config: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """The checkpoint's run trained on the dataset data.root holds now, by the digest of its
    manifest (which the checkpoint records; older ones do not), whatever the path is called."""
    if state.get("dataset") and state["dataset"] != manifest_digest(config.data.root):
        raise ValueError(
            f"{path} was trained on another dataset than data.root={config.data.root} holds now (their manifests "
            "differ); resuming would mix two datasets. Point data.root at the dataset the run trained on, or use "
            "a new run.out_dir")


def _same_source(saved: dict, current: dict, section: str, key: str, dataset: str | None) -> bool:
    """A path the run reads, named another way or moved, with the same content.

    data.root: the same dataset when its manifest's digest is the one the checkpoint recorded (a
    copy on another disk; checkpoints from before the digest: the same folder). A co-training
    sub-stage's init and sampler checkpoints are the schedule's own earlier sub-stages, under the
    schedule's directory (the parent of run.out_dir): the same file relative to it, when the
    schedule directory was moved or named by another path (relative, absolute)."""
    old, new = saved.get(section, {}).get(key), current[section][key]
    if (section, key) == ("data", "root"):  # with a digest, check_same_dataset compared the contents
        return bool(dataset) or _same_path(old, new)
    if (section, key) not in (("stage", "init_checkpoint"), ("stage", "sampler_checkpoint")):
        return False
    if not old or not new:
        return False
    if _same_path(old, new):
        return True
    roots = Path(saved["run"]["out_dir"]).parent, Path(current["run"]["out_dir"]).parent
    try:
        return Path(old).relative_to(roots[0]) == Path(new).relative_to(roots[1])
    except ValueError:  # not under the schedule's directory: a checkpoint the user named
        return False


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _same_path(old: str | None, new: str) -> bool:
    """Two spellings of one file or folder (relative ones as seen from here)."""
    return bool(old) and Path(old).resolve() == Path(new).resolve()


def plan(config: TrainConfig, world_size: int, sub_stages: list[tuple[str, TrainConfig]]) -> str:
    """What `--plan` prints: per sub-stage (or the one run) its epochs, steps and clips at this
    many processes, and the totals; the dataset is checked, nothing is written."""
    global_batch = config.data.batch_size * world_size
    check_layout(config, world_size)
    check_dataset(config, modalities(config) if not config.schedule.cycles else ("rgb", "flow"), global_batch)
    rows, total_steps = [], 0
    for name, stage in sub_stages:
        per_epoch = epoch_steps(stage, world_size)
        if stage.stage.kind == "cotrain":
            # in a schedule, a co-training sub-stage's epochs are schedule.cotrain_epochs
            key = "schedule.cotrain_epochs" if config.schedule.cycles else "optim.epochs"
            check_queue_fills(stage.loss.queue_size, global_batch, per_epoch, stage.optim.epochs, key,
                              stage.loss.mining_topk)
        steps = stage.optim.epochs * per_epoch
        if stage.run.max_steps:
            steps = min(steps, stage.run.max_steps)
        total_steps += steps
        rows.append(f"{name:<14} {stage.stage.kind:<9} {stage.optim.epochs:>6} {per_epoch:>11,} {steps:>12,} "
                    f"{steps * global_batch:>14,}")
    header = f"{'sub-stage':<14} {'kind':<9} {'epochs':>6} {'steps/epoch':>11} {'steps':>12} {'clips':>14}"
    return "\n".join([
        f"{len(sub_stages)} run(s) on {world_size} process(es), {config.data.batch_size} clips per process and "
        f"step (global batch {global_batch}), data.root={config.data.root} split {config.data.split} "
        f"{config.data.subset}:", header, *rows,
        f"{'total':<14} {'':<9} {'':>6} {'':>11} {total_steps:>12,} {total_steps * global_batch:>14,}",
        "time: clips / the run's clips_per_s (metrics.jsonl: all processes together)"])
