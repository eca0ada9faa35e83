"""Typed training configuration: dataclasses that validate themselves, and `key.sub=value` overrides.

One `TrainConfig` describes a run of either stage; a stage is configuration (docs/algorithm.md,
"one loop, stages differ by configuration"): `stage.kind` picks the step ("instance" = stage 1,
"cotrain" = stage 2), `stage.modality` the trained view, `loss.*` the terms and their weights.
Presets (cvtcl/presets.py) are plain functions returning a `TrainConfig`; the command line
overrides fields by dotted name. Every field carries a one-line reason. Validation happens in
`__post_init__`, so a config that exists is a config that makes sense; checks that need the
world size or the files (queue vs global batch, shards on disk) live in cvtcl/train.py and run
before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}")


def _positive(name: str, value: float, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")


def _milestones(key: str, epochs: tuple[int, ...]) -> None:
    """Epochs after which the lr is multiplied by optim.lr_gamma: each once (a repeated one applied
    gamma twice), from epoch 1 (0 or less lowered the lr from the start)."""
    if any(b <= a for a, b in zip(epochs, epochs[1:])) or any(e < 1 for e in epochs):
        raise ValueError(f"{key}={list(epochs)} must be strictly increasing epochs >= 1")


MIN_TAU = 1e-3  # loss.tau below this makes logits of unit vectors exceed +-1000


@dataclass
class DataConfig:
    root: str = "data/ucf101"  # dataset directory written by `cvtcl-preprocess` (manifest.json + shards)
    split: str = "1"  # official split id; pretraining uses its train subset only
    subset: str = "train"  # never pretrain on the test videos the evaluation queries with
    frames_per_clip: int = 32  # T (paper §3.2: 32 frames)
    frame_stride: int = 1  # temporal subsampling of the window (paper: consecutive frames)
    crop_size: int = 128  # H = W after random resized crop (paper: 128x128)
    crop_scale_min: float = 0.2  # smallest area fraction of that crop (CoCLR's 0.2); the demo raises it
    pair_mode: str = "same"  # how the two copies relate in time; "same" = paper §2.1
    segments: str = "quarters"  # local segments: slices of the clip (paper §2.3) or "spread"
    num_segments: int = 4  # M (paper: four non-overlapping segments)
    batch_size: int = 16  # clips per process (GPU); global batch = batch_size x world size
    num_threads: int = 4  # DALI CPU threads per process (file reads, CPU-mode decode)
    backend: str = "dali"  # "dali" (GPU or DALI CPU mode) or the plain PyTorch baseline loader
    augment: str = "standard"  # per-copy strength: paper's full list | weak (crop+flip) | coclr mix (docs/algorithm.md)
    dihedral: bool = False  # random D4 element (transpose, flips) per clip copy, flow-aware (cvtcl/augment.py)

    def __post_init__(self):
        _choice("data.pair_mode", self.pair_mode, ("same", "independent", "coclr"))
        _choice("data.segments", self.segments, ("quarters", "spread"))
        _choice("data.backend", self.backend, ("dali", "baseline"))
        _choice("data.augment", self.augment, ("standard", "weak", "coclr"))
        for name in ("frames_per_clip", "frame_stride", "crop_size", "num_segments", "batch_size", "num_threads"):
            _positive(f"data.{name}", getattr(self, name))
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min={self.crop_scale_min} must be in (0, 1] (an area fraction)")
        if self.frames_per_clip % self.num_segments:
            raise ValueError(
                f"data.frames_per_clip={self.frames_per_clip} must be divisible by data.num_segments="
                f"{self.num_segments} (segments are L = T / M frames)"
            )
        if self.segments == "quarters" and self.pair_mode != "same":
            raise ValueError(
                "data.segments=quarters slices the two copies of one clip, so segment j of both copies "
                f"must hold the same frames: set data.pair_mode=same (got {self.pair_mode!r}) or data.segments=spread"
            )


@dataclass
class ModelConfig:
    backbone: str = "s3d"  # paper: S3D; "tiny" is a small 3D CNN for CPU tests and the demo only
    embed_dim: int = 128  # D, output of the projection head (paper: 128)
    channels_last_3d: bool = False  # NDHWC weights/activations; measure with benchmarks/train_speed.py

    def __post_init__(self):
        _choice("model.backbone", self.backbone, ("s3d", "tiny"))
        _positive("model.embed_dim", self.embed_dim)


@dataclass
class StageConfig:
    kind: str = "instance"  # "instance" = stage 1 (eq. 1 + LTCL); "cotrain" = stage 2 (mined positives)
    modality: str = "rgb"  # the view being trained ("rgb" or "flow")
    sampler_checkpoint: str = ""  # stage 2: checkpoint of the frozen encoder of the other modality
    init_checkpoint: str = ""  # start from these query weights (copied into query and key encoders)

    def __post_init__(self):
        _choice("stage.kind", self.kind, ("instance", "cotrain"))
        _choice("stage.modality", self.modality, ("rgb", "flow"))
        if self.kind == "cotrain" and not self.sampler_checkpoint:
            raise ValueError("stage.kind=cotrain mines positives with a frozen sampler: set stage.sampler_checkpoint")

    @property
    def sampler_modality(self) -> str:
        return "flow" if self.modality == "rgb" else "rgb"


@dataclass
class LossConfig:
    tau: float = 0.07  # softmax temperature of every contrastive term (CoCLR: 0.07; the paper is silent)
    queue_size: int = 2048  # K negatives (CoCLR: 2048); must be a multiple of the global batch
    momentum: float = 0.999  # m of the key encoder's EMA (CoCLR: 0.999; the paper is silent)
    instance_weight: float = 1.0  # alpha: weight of the instance term (eq. 1 or eqs. 2/4)
    ltcl_weight: float = 1.0  # beta: weight of L_LTCL (eq. 8); 0 turns the local terms off
    local_queries: str = "first"  # "first" = paper's z_1; "all" = every segment a query (beyond paper)
    bn_groups: int = 2  # one process: shuffled BN groups of the key encoder (emulates shuffle-BN)
    mining_topk: int = 5  # stage 2: queue entries mined as positives by the sampler (paper: K = 5)
    self_positive_drop: float = 0.9  # stage 2: chance per step to drop the own key from the numerator (CoCLR)

    def __post_init__(self):
        _positive("loss.tau", self.tau)
        if self.tau < MIN_TAU:  # cosines / tau: 1e-20 trained on losses of 1e18, 1e-39 gave NaN
            raise ValueError(f"loss.tau={self.tau!r} is below {MIN_TAU}: the logits (cosines / tau) would be "
                             "beyond what a softmax resolves; contrastive temperatures are 0.05-1 (CoCLR: 0.07)")
        _positive("loss.queue_size", self.queue_size)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"loss.momentum={self.momentum} must be in [0, 1)")
        _positive("loss.instance_weight", self.instance_weight, zero_ok=True)
        _positive("loss.ltcl_weight", self.ltcl_weight, zero_ok=True)
        _choice("loss.local_queries", self.local_queries, ("first", "all"))
        if self.bn_groups < 2:
            raise ValueError(f"loss.bn_groups={self.bn_groups}: at least 2, or BN statistics leak the positive")
        _positive("loss.mining_topk", self.mining_topk, zero_ok=True)
        if not 0.0 <= self.self_positive_drop <= 1.0:
            raise ValueError(f"loss.self_positive_drop={self.self_positive_drop} must be in [0, 1]")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam learning rate (paper §3.2: 1e-3)
    weight_decay: float = 1e-4  # Adam L2 weight decay (paper §3.2: 1e-4)
    epochs: int = 300  # stage 1: 300 epochs (paper §3.2)
    lr_milestones: tuple[int, ...] = (250, 280)  # epochs where lr is multiplied by lr_gamma (CoCLR: 250, 280)
    lr_gamma: float = 0.1  # x0.1 at each milestone (CoCLR; the paper is silent)
    amp: str = "auto"  # bf16 on compute capability >= 8.0, fp16 on 7.x, else fp32 (our choice; paper: fp32 = strict)
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the paper does not clip)

    def __post_init__(self):
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, zero_ok=True)
        _positive("optim.epochs", self.epochs)
        _positive("optim.lr_gamma", self.lr_gamma)
        _milestones("optim.lr_milestones", self.lr_milestones)
        _choice("optim.amp", self.amp, ("auto", "bf16", "fp16", "fp32"))
        _positive("optim.grad_clip", self.grad_clip, zero_ok=True)


COMPILE_MODES = ("none", "encoder", "graph", "step")  # run.compile
GRAPH_SCOPES = ("auto", "step", "calls")  # run.graph_scope


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # checkpoints, config.json, metrics.jsonl; rerunning resumes here
    seed: int = 0  # one seed fixes init, data order, augmentation and shuffle-BN permutations
    device: str = "auto"  # auto = cuda:LOCAL_RANK when available, else cpu
    log_every: int = 10  # steps between metrics.jsonl lines (and progress updates)
    checkpoint_every: int = 1000  # steps between checkpoints (one is also written after every epoch)
    keep_checkpoints: int = 3  # older checkpoints are deleted; 0 keeps all
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = all epochs
    progress: str = "auto"  # auto = rich bar on a terminal, plain lines otherwise; "none" = silent
    expect_world_size: int = 0  # refuse other world sizes (a preset tied to a GPU layout); 0 = any
    knn_every: int = 0  # epochs between kNN retrieval checks on rank 0 (paper Fig. 3; cvtcl.retrieval); 0 = off
    compile: str = "none"  # none | encoder (torch.compile them) | graph (step as one CUDA graph) | step (both); graphs: CUDA only
    graph_scope: str = "auto"  # auto | step | calls: run.compile=graph captures the step (auto: 1 process) or each encoder call (auto: torchrun)
    legacy_step: bool = False  # the old eager step: a host sync per step, two key-encoder calls (benchmark baseline)

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"run.device={self.device!r}: choose auto, cpu, cuda or cuda:N")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"run.seed={self.seed} must be in 0 .. 2**63 - 1")
        _choice("run.progress", self.progress, ("auto", "rich", "plain", "none"))
        _positive("run.log_every", self.log_every)
        _positive("run.checkpoint_every", self.checkpoint_every)
        _positive("run.keep_checkpoints", self.keep_checkpoints, zero_ok=True)
        _positive("run.max_steps", self.max_steps, zero_ok=True)
        _positive("run.expect_world_size", self.expect_world_size, zero_ok=True)
        _positive("run.knn_every", self.knn_every, zero_ok=True)
        _choice("run.compile", self.compile, COMPILE_MODES)
        _choice("run.graph_scope", self.graph_scope, GRAPH_SCOPES)
        if self.graph_scope == "calls" and self.compile != "graph":
            raise ValueError(f"run.graph_scope=calls graphs the eager encoders' calls, with run.compile=graph; "
                             f"run.compile is {self.compile}")

    @property
    def captures_step(self) -> bool:
        """Whether run.compile asks for the step as one CUDA graph (cvtcl/graphed.py)."""
        return self.compile in ("graph", "step")


@dataclass
class ScheduleConfig:
    cycles: int = 0  # 0 = one run as stage.* says; N = stage 1 rgb + flow, then N co-training cycles (paper: 2)
    cotrain_epochs: int = 100  # epochs of each stage-2 sub-stage (paper §2.4: 100)
    cotrain_lr_milestones: tuple[int, ...] = (80,)  # stage-2 epochs where lr x optim.lr_gamma (paper: 80)
    cotrain_ltcl_rgb: bool = True  # keep L_LTCL when rgb mines from flow (paper Table 2: on)
    cotrain_ltcl_flow: bool = False  # keep L_LTCL when flow mines from rgb (paper Table 2: off)

    def __post_init__(self):
        self.cotrain_lr_milestones = tuple(int(m) for m in self.cotrain_lr_milestones)
        _positive("schedule.cycles", self.cycles, zero_ok=True)
        _positive("schedule.cotrain_epochs", self.cotrain_epochs)
        _milestones("schedule.cotrain_lr_milestones", self.cotrain_lr_milestones)

# Smallest input (frames, height = width) each backbone accepts: torchvision S3D's strided pools
# collapse a time axis under 5 frames and a spatial axis under 32 pixels (measured, torchvision 0.29).
MIN_INPUT = {"s3d": (5, 32), "tiny": (1, 1)}

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "stage": StageConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "schedule": ScheduleConfig,
}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        if self.loss.instance_weight == 0 and self.loss.ltcl_weight == 0:
            raise ValueError("loss.instance_weight=0 and loss.ltcl_weight=0 leave no loss to train on; set one > 0")
        if self.data.segments == "spread" and self.stage.kind == "instance" and self.loss.ltcl_weight == 0:
            raise ValueError("data.segments=spread only feeds L_LTCL; with loss.ltcl_weight=0 use segments=quarters")
        min_frames, min_size = MIN_INPUT[self.model.backbone]
        frames = self.data.frames_per_clip // (self.data.num_segments if self.uses_segments else 1)
        if frames < min_frames or self.data.crop_size < min_size:
            raise ValueError(
                f"model.backbone={self.model.backbone} needs >= {min_frames} frames and >= {min_size} pixels per "
                f"input; got {frames}-frame {'segments' if self.uses_segments else 'clips'} "
                f"(data.frames_per_clip / data.num_segments) of {self.data.crop_size} pixels (data.crop_size)"
            )

    @property
    def uses_segments(self) -> bool:
        return self.loss.ltcl_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (str, int, float, bool, list): JSON- and weights_only-safe."""
        out = dataclasses.asdict(self)
        out["optim"]["lr_milestones"] = list(self.optim.lr_milestones)
        out["schedule"]["cotrain_lr_milestones"] = list(self.schedule.cotrain_lr_milestones)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise KeyError(f"unknown config section(s) {unknown}; sections are {sorted(SECTIONS)}")
        sections = {}
        for name, section in SECTIONS.items():
            values = dict(data.get(name, {}))
            extra = sorted(set(values) - {f.name for f in dataclasses.fields(section)})
            if extra:
                raise KeyError(_unknown_key_message(f"{name}.{extra[0]}"))
            sections[name] = section(**values)
        return cls(**sections)


def _field_types() -> dict[str, Any]:
    """'section.field' -> the field's type, for parsing override strings."""
    return {
        f"{name}.{key}": hint
        for name, section in SECTIONS.items()
        for key, hint in typing.get_type_hints(section).items()
    }


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(_field_types()), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; run with --help-config to list every key"
    return f"unknown config key {key!r}{hint}"


def _parse(key: str, text: str, hint: Any) -> Any:
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes", "on")
        if typing.get_origin(hint) is tuple:
            items = text.strip().strip("[]()").replace(",", " ").split()
            return tuple(int(item) for item in items)
        return hint(text)
    except ValueError as err:
        raise ValueError(f"config key {key!r}: cannot read {text!r} as {getattr(hint, '__name__', hint)} ({err})") from None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Return a new, re-validated config with `section.field=value` overrides applied in order."""
    types = _field_types()
    data = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override {item!r} is not key=value (example: optim.lr=5e-4)")
        if key not in types:
            raise KeyError(_unknown_key_message(key))
        section, name = key.split(".")
        data[section][name] = _parse(key, text, types[key])
    return TrainConfig.from_dict(data)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A value read from a config file, checked against the field's type (YAML's `split: 1` is a str)."""
    if isinstance(value, str) and hint is not str:
        return _parse(key, value, hint)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    name = getattr(hint, "__name__", None) or "a list of integers"
    raise ValueError(f"config key {key!r}: expected {name}, got {value!r}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """{section: {field: value}} from a YAML or JSON file (`.json` is read as JSON, anything else as
    YAML, which also reads JSON). A run's own config.json has this shape and is accepted as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; give a YAML or JSON file, or a run's config.json")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not a text file ({err.reason} at byte {err.start}); "
                         "give a YAML or JSON file") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    except Exception as err:  # yaml.YAMLError, without importing yaml for JSON files
        if type(err).__module__.split(".")[0] != "yaml":
            raise
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--config {path}: expected sections of key: value, e.g. 'optim:' then '  lr: 0.0005' "
                         f"(sections: {', '.join(SECTIONS)})")
    return data


def apply_file(config: TrainConfig, data: dict[str, Any], where: str) -> TrainConfig:
    """Return a new, re-validated config with a config file's values (read_config_file) applied."""
    types = _field_types()
    merged = config.to_dict()
    for section, values in data.items():
        if section not in SECTIONS:
            raise KeyError(f"{where}: unknown config section {section!r}; sections are {', '.join(SECTIONS)}")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in types:
                raise KeyError(f"{where}: {_unknown_key_message(key)}")
            try:
                merged[section][name] = _coerce(key, value, types[key])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return TrainConfig.from_dict(merged)


def describe(config: TrainConfig | None = None) -> str:
    """Every key with its value in `config` (default: the dataclass defaults) and its reason, for
    `--help-config`."""
    import inspect

    lines = []
    for name, section in SECTIONS.items():
        values = getattr(config, name) if config is not None else section()
        source = inspect.getsource(section).splitlines()
        for f in dataclasses.fields(section):
            reason = next((line.split("#", 1)[1].strip() for line in source if line.strip().startswith(f"{f.name}:") and "#" in line), "")
            lines.append(f"{name}.{f.name} = {getattr(values, f.name)!r}  # {reason}")
    return "\n".join(lines)
