"""Named training presets: plain functions returning a `TrainConfig`.

`--preset NAME` picks one; `key.sub=value` arguments override its fields. A preset states only
what differs from the dataclass defaults, which already are the stage-1 values: from the paper
(§3.2: Adam lr 1e-3, wd 1e-4, 300 epochs, 32x128x128, 8 GPUs) and, where the paper is silent,
from CoCLR (lr x0.1 at 250 and 280, K 2048, tau 0.07, m 0.999, 16 clips per GPU). `optim.amp`
is our choice ("auto": bf16/fp16 where the GPU has tensor cores); the paper trained in fp32, and
`optim.amp=fp32` is the strict reproduction setting.

Batch size: the paper trains on 8 GPUs and does not state the per-GPU batch in the text we follow;
its released code silently used 8 per GPU. We use 16 clips per GPU (global 128 on 8 GPUs, which
divides K = 2048), our estimate of the largest S3D 32x128 stage-1 batch that fits a 12 GB TITAN Xp
in fp32 (not measured on that card: docs/hardware.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from cvtcl.config import (
    DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig, StageConfig, TrainConfig,
)


def ucf101_stage1(modality: str) -> TrainConfig:
    """Stage 1 on UCF101 split 1 train, S3D, the paper's hyper-parameters, any number of GPUs."""
    return TrainConfig(
        data=DataConfig(root="data/ucf101", batch_size=16),
        model=ModelConfig(backbone="s3d"),
        stage=StageConfig(kind="instance", modality=modality),
        run=RunConfig(out_dir=f"runs/ucf101-stage1-{modality}"),
    )


def ucf101_stage1_rgb() -> TrainConfig:
    return ucf101_stage1("rgb")


def ucf101_stage1_flow() -> TrainConfig:
    return ucf101_stage1("flow")


def paper_8x_titanxp() -> TrainConfig:
    """The paper's layout: 8 TITAN Xp (Pascal: no tensor cores, 1/64-rate fp16, so fp32), 16 per GPU.

    Refuses to start on another world size, because the global batch (128) and therefore the
    effective learning rate and the queue turnover depend on it. Override stage.modality=flow
    for the flow stream.
    """
    config = ucf101_stage1("rgb")
    config.optim = OptimConfig(amp="fp32")
    config.run = RunConfig(out_dir="runs/paper-8x-titanxp-rgb", expect_world_size=8)
    return config


def smoke() -> TrainConfig:
    """Seconds on CPU: tiny backbone, 8-frame 32x32 clips, queue 32, m 0.99, on the synthetic dataset.

    It reads the dataset `make demo` writes (demo/data; or `cvtcl-preprocess synthetic --out demo/data`).
    """
    return TrainConfig(
        data=DataConfig(
            root="demo/data", frames_per_clip=8, crop_size=32, num_segments=4, batch_size=4, num_threads=2
        ),
        model=ModelConfig(backbone="tiny"),
        stage=StageConfig(kind="instance", modality="rgb"),
        # m = 0.99: with 0.999 the key encoder stays near its random init for the first ~1000 steps,
        # longer than a smoke run (measured on synthetic shards: instance top-1 0.16 -> 0.19 in
        # 600 steps at 0.999, 0.21 -> 0.52 in 400 steps at 0.99).
        loss=LossConfig(queue_size=32, momentum=0.99),
        optim=OptimConfig(epochs=2, lr_milestones=(), amp="fp32"),
        run=RunConfig(out_dir="runs/smoke", log_every=5, checkpoint_every=50),
    )


def ucf101_cvtcl() -> TrainConfig:
    """The whole paper schedule from one command (docs/algorithm.md "Stage 2 — Schedule"): stage 1 rgb and
    flow (300 epochs each, as ucf101-stage1-*), then 2 cycles of rgb mining from flow and flow
    mining from the new rgb, 100 epochs each, lr 1e-3 x0.1 at epoch 80, L_LTCL for rgb only.
    Sub-stages live in runs/ucf101-cvtcl/<sub-stage>/; `--stage NAME` runs one of them."""
    config = ucf101_stage1("rgb")
    config.run = RunConfig(out_dir="runs/ucf101-cvtcl")
    config.schedule = ScheduleConfig(cycles=2, cotrain_epochs=100, cotrain_lr_milestones=(80,))
    return config


def smoke_cvtcl() -> TrainConfig:
    """The whole schedule at smoke size for CPU: 2 cycles, 2 epochs per sub-stage, lr drop at the
    second co-training epoch. The queue (32) fills after 8 steps of batch 4, so stage 2 trains
    only once the queue is full, as at full size."""
    config = smoke()
    config.optim = OptimConfig(epochs=2, lr_milestones=(), amp="fp32")
    config.run = RunConfig(out_dir="runs/smoke-cvtcl", log_every=2, checkpoint_every=2)
    config.schedule = ScheduleConfig(cycles=2, cotrain_epochs=2, cotrain_lr_milestones=(1,))
    return config


# Kinetics-400 (`cvtcl-preprocess kinetics400`, split "1" train = train.csv). The CVTCL paper
# pretrains on UCF101 only; where it is silent on K400 we take CoCLR's K400 commands (README of
# github.com/TengdaHan/CoCLR, "InfoNCE pretrain on K400" and "CoCLR pretrain on K400"): queue
# 16384, stage 1 300 epochs with lr x0.1 at 250 and 280, co-training 50 epochs per sub-stage with
# lr x0.1 at 40. Everything else stays the paper's (README, "Presets").
K400_QUEUE = 16384
K400_COTRAIN_EPOCHS, K400_COTRAIN_MILESTONES = 50, (40,)


def k400_stage1(modality: str) -> TrainConfig:
    """Stage 1 on Kinetics-400 train: as ucf101-stage1-*, with CoCLR's K400 queue (16384)."""
    config = ucf101_stage1(modality)
    config.data.root = "data/kinetics400"
    config.loss.queue_size = K400_QUEUE
    config.run = RunConfig(out_dir=f"runs/k400-stage1-{modality}")
    return config


def k400_stage1_rgb() -> TrainConfig:
    return k400_stage1("rgb")


def k400_stage1_flow() -> TrainConfig:
    return k400_stage1("flow")


def k400_cvtcl() -> TrainConfig:
    """The whole schedule on Kinetics-400: stage 1 as k400-stage1-*, then the paper's 2 cycles with
    CoCLR's K400 sub-stage length (50 epochs, lr x0.1 at 40)."""
    config = k400_stage1("rgb")
    config.run = RunConfig(out_dir="runs/k400-cvtcl")
    config.schedule = ScheduleConfig(cycles=2, cotrain_epochs=K400_COTRAIN_EPOCHS,
                                     cotrain_lr_milestones=K400_COTRAIN_MILESTONES)
    return config


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "ucf101-stage1-rgb": ucf101_stage1_rgb,
    "ucf101-stage1-flow": ucf101_stage1_flow,
    "paper-8x-titanxp": paper_8x_titanxp,
    "smoke": smoke,
    "ucf101-cvtcl": ucf101_cvtcl,
    "smoke-cvtcl": smoke_cvtcl,
    "k400-stage1-rgb": k400_stage1_rgb,
    "k400-stage1-flow": k400_stage1_flow,
    "k400-cvtcl": k400_cvtcl,
}


def get_preset(name: str) -> TrainConfig:
    """A fresh config for preset `name`; unknown names fail with the closest match."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(f"unknown preset {name!r}: {hint}presets are {', '.join(PRESETS)}")
    return PRESETS[name]()
