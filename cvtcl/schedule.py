"""The whole two-stage CVTCL schedule as a list of sub-stages, run and resumed from one command.

docs/algorithm.md "Stage 2 — Schedule" (paper §2.4): stage 1 trains rgb and flow alone; then
`cycles` times: rgb mines from the latest flow, then flow mines from the new rgb. Each stage-2
sub-stage starts from the trained modality's latest weights (the trainer copies the query
weights into query and key encoders) and uses the other modality's latest query encoder as its
frozen sampler.

Each sub-stage is one ordinary run of the one training loop in its own directory
`<root>/<name>/` (its checkpoints are kept there). Resuming the whole schedule is therefore
nothing more than: skip sub-stages whose run is complete, resume the first incomplete one from
its own directory (the trainer's auto-resume), and continue. This module only decides *what*
runs and *from which weights*; the trainer owns how a run trains, checkpoints and resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MODALITIES = ("rgb", "flow")


@dataclass(frozen=True)
class SubStage:
    """One run of the training loop.

    name: directory name and the `--stage` argument ("stage1-rgb", "cycle2-flow", ...).
    modality: the modality trained here.
    init: the sub-stage whose trained query weights initialise this one (None: random init).
    sampler: the sub-stage whose query encoder is the frozen sampler (None: stage 1, no mining).
    """

    name: str
    modality: str
    init: str | None = None
    sampler: str | None = None

    @property
    def is_cotraining(self) -> bool:
        return self.sampler is not None

    @property
    def cycle(self) -> int:
        """0 for stage 1, 1.. for the co-training cycles (read from the name)."""
        return int(self.name[len("cycle"):].split("-")[0]) if self.name.startswith("cycle") else 0


def cvtcl_schedule(cycles: int = 2, modalities: Sequence[str] = MODALITIES) -> list[SubStage]:
    """stage1-rgb, stage1-flow, then per cycle c: cycle<c>-rgb (mines from the latest flow),
    cycle<c>-flow (mines from cycle<c>-rgb). The first modality in `modalities` trains first in
    each cycle (rgb first, as in the paper and CoCLR)."""
    if sorted(modalities) != sorted(MODALITIES):
        raise ValueError(f"schedule modalities must be an order of {MODALITIES}, got {tuple(modalities)}")
    if cycles < 0:
        raise ValueError(f"schedule cycles must be >= 0, got {cycles}")
    stages = [SubStage(f"stage1-{m}", m) for m in modalities]
    latest = {m: f"stage1-{m}" for m in modalities}
    for cycle in range(1, cycles + 1):
        for m in modalities:
            other = next(o for o in modalities if o != m)
            stage = SubStage(f"cycle{cycle}-{m}", m, init=latest[m], sampler=latest[other])
            stages.append(stage)
            latest[m] = stage.name
    return stages


def select(stages: Sequence[SubStage], name: str | None) -> list[SubStage]:
    """All sub-stages, or the one named by `--stage NAME` (unknown names list the valid ones)."""
    if name is None:
        return list(stages)
    for stage in stages:
        if stage.name == name:
            return [stage]
    raise ValueError(f"--stage {name!r} is not in this schedule; choose one of {[s.name for s in stages]}")


def warmup_steps(queue_size: int, global_batch: int) -> int:
    """Steps a co-training run takes before its queue is full: they train nothing (cvtcl/cotrain.py)."""
    return -(-queue_size // global_batch)


def check_queue_fills(queue_size: int, global_batch: int, steps_per_epoch: int, epochs: int, epochs_key: str,
                      mining_topk: int) -> None:
    """Refuse, before any work, a co-training run whose queue is still filling at its last step (it
    would end "complete" without a single optimizer step), or whose top-K mining takes the whole
    queue as positives (no negative would be left: the loss only pushes the query from its own key)."""
    if mining_topk >= queue_size:
        raise ValueError(f"loss.mining_topk={mining_topk} is not below loss.queue_size={queue_size}: co-training "
                         "takes the top-K queue entries as positives and contrasts with the rest, and none would "
                         "be left; lower loss.mining_topk (the paper: 5) or raise loss.queue_size")
    warmup = warmup_steps(queue_size, global_batch)
    steps = steps_per_epoch * epochs
    if steps <= warmup:
        raise ValueError(
            f"co-training takes no optimizer step until its queue is full: loss.queue_size={queue_size} needs "
            f"{warmup} steps of global batch {global_batch}, but {epochs_key}={epochs} epochs of {steps_per_epoch} "
            f"steps are {steps}. Raise {epochs_key} above {warmup // max(steps_per_epoch, 1)} or lower "
            "loss.queue_size (a multiple of the global batch)"
        )


@dataclass(frozen=True)
class StageRun:
    """What the trainer needs to run one sub-stage: where, and from which checkpoints."""

    stage: SubStage
    run_dir: Path
    init_checkpoint: Path | None
    sampler_checkpoint: Path | None


def run_schedule(
    stages: Sequence[SubStage],
    root: Path,
    run_one: Callable[[StageRun], None],
    is_complete: Callable[[Path], bool],
    final_checkpoint: Callable[[Path], Path],
    only: str | None = None,
    log: Callable[[str], None] = print,
    resume_advice: Callable[[], str] = lambda: "rerun the same command to resume",
) -> list[StageRun]:
    """Run every incomplete sub-stage in order (or only `only`), resuming the interrupted one.

    run_one(StageRun): trains one sub-stage to completion, auto-resuming from `run_dir`; returns
    whether a stop was asked for (the signal), which ends the schedule after that sub-stage.
    is_complete(run_dir): whether that run finished all its epochs.
    final_checkpoint(run_dir): the checkpoint a finished run leaves (init and sampler source).
    resume_advice(): what to do when a sub-stage stopped before its end (after the run that stopped).
    A sub-stage whose dependencies are incomplete fails with the sub-stage to run first, which
    only happens with `--stage` (in order, dependencies always run first).
    Returns the StageRun of every sub-stage that ran (completed ones are skipped); the last one
    may be unfinished when the trainer was asked to stop (SIGTERM), and then nothing after it ran.
    """
    root = Path(root)
    by_name = {s.name: s for s in stages}
    ran = []
    for stage in select(stages, only):
        run_dir = root / stage.name
        if is_complete(run_dir):
            log(f"[schedule] {stage.name}: complete in {run_dir}, skipped")
            continue
        sources = {}
        for role in ("init", "sampler"):
            dep = getattr(stage, role)
            if dep is None:
                sources[role] = None
                continue
            if dep not in by_name:
                raise ValueError(f"sub-stage {stage.name} needs {dep!r} ({role}), which is not in the schedule")
            if not is_complete(root / dep):
                raise FileNotFoundError(
                    f"sub-stage {stage.name} needs the finished run {root / dep} as its {role}; "
                    f"run `--stage {dep}` (or the whole schedule without --stage) first")
            sources[role] = final_checkpoint(root / dep)
        run = StageRun(stage, run_dir, sources["init"], sources["sampler"])
        log(f"[schedule] {stage.name} ({list(stages).index(stage) + 1} of {len(stages)}): training {stage.modality}"
            + (f", sampler {stage.sampler}" if stage.sampler else "") + f" in {run_dir}")
        stopped = run_one(run)
        ran.append(run)
        if not is_complete(run_dir):
            # A stop request (SIGTERM) made the trainer checkpoint and return early: stop here too.
            log(f"[schedule] {stage.name}: stopped before its last epoch; {resume_advice()}")
            break
        if stopped:  # asked during its last step: the sub-stage is whole, the schedule stops all the same
            log(f"[schedule] {stage.name}: complete; stopped before the next sub-stage; {resume_advice()}")
            break
    return ran
