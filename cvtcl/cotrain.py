"""Stage 2, cross-view co-training, as configuration of the one training loop (paper §2.2, §2.4).

Importing this module registers `cotrain_step` as `engine.STEPS["cotrain"]`. The loop, the
checkpoints and the metrics are the stage-1 ones; a co-training run differs by

- the two-stream batch: rgb and flow of the same frames with the same crop/flip;
- a frozen sampler of the other modality (`load_sampler`: its checkpoint's query encoder, eval
  mode, no gradient), outside the checkpointed model: it is reloaded from
  `stage.sampler_checkpoint` on every (re)start;
- a cross-view queue (keys of m + sampler embeddings of o + video, group, label per entry);
- the multi-positive loss L_RF / L_FR (eqs. 2–5, cvtcl/mining.py) instead of eq. 1;
- no optimizer step until the queue is full (its random initial keys and empty ids would make
  the first mined positives meaningless; CoCLR trains on nothing before that either).

`stage_config` derives the config of one sub-stage of the whole schedule (cvtcl/schedule.py)
from the preset's config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from cvtcl import engine, mining
from cvtcl.checkpoint import latest_loadable, load_encoder
from cvtcl.config import TrainConfig
from cvtcl.schedule import StageRun


class FrozenSampler(nn.Module):
    """The other modality's encoder as a fixed function: eval-mode BN, no gradient, never trained.

    `train()` on a parent module cannot switch its BN back to batch statistics, which would make
    the sampler's embeddings depend on the batch it happens to be in.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenSampler:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, T, H, W] of the sampler's modality -> [N, D] unit-norm embeddings."""
        return self.encoder(x)


def load_sampler(config: TrainConfig, device: torch.device) -> FrozenSampler:
    """The query encoder of `stage.sampler_checkpoint`, checked to be of the other modality."""
    encoder, _ = load_encoder(config.stage.sampler_checkpoint, which="query", map_location=device)
    check_sampler(encoder.config(), config)
    return FrozenSampler(encoder)


def check_sampler(encoder: dict, config: TrainConfig) -> None:
    """The sampler checkpoint's encoder (its constructor arguments, a checkpoint's "encoder") is of
    the other modality and embeds in the queue's space; checked before any work too (preflight)."""
    path = config.stage.sampler_checkpoint
    if encoder["modality"] != config.stage.sampler_modality:
        raise ValueError(
            f"stage.sampler_checkpoint={path} holds a {encoder['modality']} encoder; training "
            f"{config.stage.modality} needs a {config.stage.sampler_modality} sampler"
        )
    if encoder["embed_dim"] != config.model.embed_dim:
        raise ValueError(f"stage.sampler_checkpoint={path} embeds in {encoder['embed_dim']} dims, model.embed_dim is "
                         f"{config.model.embed_dim}: mining compares sampler embeddings in the queue's space")


def cotrain_step(ctx: engine.Context, batch: dict[str, torch.Tensor], draws: engine.StepDraws) -> engine.StepOutput:
    """Stage 2: L2 = alpha * L_RF or L_FR (eqs. 2–5) + beta * L_LTCL (eqs. 6–8), modality m mining
    its positives with the frozen sampler of modality o."""
    config, model = ctx.config, ctx.model
    # Whether this step trains is decided before its own keys enter the queue. A warm-up step
    # builds no graph: its losses are only logged, and DDP is never left waiting for a backward.
    optimize = model.queue.is_full  # a host count (moco.Queue), not a device read
    with torch.set_grad_enabled(optimize):
        clips = batch[config.stage.modality]  # [B, V=2, C, T, H, W]: copy 0 = query, copy 1 = key
        z, z_local = engine.encode_queries(ctx, batch)  # [B, D], [B, Mq, D] (None without L_LTCL)
        keys = model.encode_keys(clips[:, 1], draws.permutation())  # [B, D]
        s = ctx.sampler(batch[config.stage.sampler_modality][:, 1])  # [B, D]: same frames and crop as the key copy
        video_index, group, label = batch["video_index"], batch["group"], batch["label"]
        instance, stats = mining.cross_view_nce(
            z, keys, s, model.queue, video_index, group, label, tau=config.loss.tau,
            topk=config.loss.mining_topk, drop=draws.flag(),
        )
        loss = config.loss.instance_weight * instance
        terms = {"loss_instance": instance.detach(), "top1_instance": stats.pop("top1"), **stats}
        if config.uses_segments:
            ltcl, ltcl_terms = engine.ltcl_step(ctx, batch, draws, z_local)
            loss = loss + config.loss.ltcl_weight * ltcl
            terms |= ltcl_terms
    terms["loss"] = loss.detach()
    terms["queue_full"] = torch.full((), float(optimize), device=loss.device)  # a fill, not a host copy

    def enqueue() -> None:
        model.queue.enqueue(keys, video_index, group, sampler=s, label=label)

    return engine.StepOutput(loss, terms, enqueue=enqueue, optimize=optimize)


def cotrain_draws(config: TrainConfig, global_batch: int) -> list[tuple[str, float]]:
    """The clips' key permutation, the self-positive drop, then the segments' key permutation."""
    spec = [("perm", global_batch), ("flag", config.loss.self_positive_drop)]
    if config.uses_segments:
        spec.append(("perm", global_batch * config.data.num_segments))
    return spec


engine.STEPS["cotrain"] = cotrain_step
engine.DRAWS["cotrain"] = cotrain_draws


def stage_config(base: TrainConfig, run: StageRun) -> TrainConfig:
    """The config of one sub-stage of the schedule, derived from the preset's `base` config.

    Stage 1 keeps `base`'s optimisation (paper: 300 epochs, milestones 250/280); stage 2 uses the
    schedule's epochs and milestones and turns L_LTCL on or off per modality (paper Table 2).
    Everything is a pure function of (base, run), so a rerun derives the same config and resumes.
    """
    stage, sched = run.stage, base.schedule
    data = dataclasses.asdict(base)
    data["run"]["out_dir"] = str(run.run_dir)
    data["schedule"] = {}  # a sub-stage is one plain run
    data["stage"] = {
        "kind": "cotrain" if stage.is_cotraining else "instance",
        "modality": stage.modality,
        # absolute: the sub-stage's config.json names its inputs from any working directory
        "init_checkpoint": str(Path(run.init_checkpoint).absolute()) if run.init_checkpoint else "",
        "sampler_checkpoint": str(Path(run.sampler_checkpoint).absolute()) if run.sampler_checkpoint else "",
    }
    if stage.is_cotraining:
        data["optim"]["epochs"] = sched.cotrain_epochs
        data["optim"]["lr_milestones"] = sched.cotrain_lr_milestones
        keep_ltcl = sched.cotrain_ltcl_rgb if stage.modality == "rgb" else sched.cotrain_ltcl_flow
        if not keep_ltcl:
            data["loss"]["ltcl_weight"] = 0.0
    return TrainConfig.from_dict(data)


def checkpoint_of(run_dir: Path) -> Path:
    """The checkpoint a finished sub-stage hands to the next ones (its latest complete one: the
    newest that loads, the one `is_complete` read)."""
    latest, _ = latest_loadable(run_dir, mmap=True)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint; run its sub-stage first")
    return latest
