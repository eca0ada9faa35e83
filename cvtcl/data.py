"""The data factory: the one place that imports `dali_pipelines` (docs/contributing.md rule 1).

docs/design.md "Loader", docs/algorithm.md "Data per training sample". Two loaders:

    loader = build_pretrain_loader(root, batch_size=8, modalities=("rgb",), device="cuda")
    loader.steps_per_epoch            # drop_last, equal on every rank
    for batch in loader.epoch(epoch, start_step):   # resume = (epoch, step), nothing else
        batch["rgb"]                  # [B, V=2, 3, T, H, W]
        batch["flow"]                 # [B, V=2, 2, T, H, W]  (when requested)
        batch["rgb_segments"]         # [B, V, M, 3, L, H, W] (segments="spread" only)
        batch["video_index"], batch["group"], batch["label"]   # Long[B]

    evaluation = build_eval_loader(root, modality="rgb", crops="ten")
    for batch in evaluation:          # {"rgb": [B, Ncrop, C, T, H, W], "video_index", "label"}

backend "dali" runs the DALI pipelines (GPU with device="cuda", DALI's CPU-only mode with
device="cpu"); backend "baseline" runs the PyTorch DataLoader with OpenCV (the benchmark's
comparison point and the fallback without DALI). Both give the same samples for the same seed.
`num_workers` (an addition to the interface, optional): processes that read shards
(DALI's parallel external source, or the DataLoader's workers); default 2, 0 reads in-process.
"""

from __future__ import annotations

import importlib.util

import torch

from dali_pipelines.iterate import worker_died
from dali_pipelines.sampling import SamplingConfig, steps_per_epoch
from dali_pipelines.source import EvalSource, select_videos
from preprocess.shards import ShardReader

BACKENDS = ("dali", "baseline")


def loader_failure(where: str, text: str) -> OSError | None:
    """The loaders' one-line error for a DataLoader worker's death, which torch's SIGCHLD handler
    raises in whatever the main thread runs (the step, not the loader); None for another error."""
    return worker_died(where, text) if "DataLoader worker" in text else None


def dali_installed() -> bool:
    """Whether DALI can be imported here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("nvidia.dali") is not None


def _check(backend: str, device: str, modalities, reader: ShardReader) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose 'cpu' or 'cuda'")
    if backend == "dali" and not dali_installed():
        raise ImportError(
            "backend='dali' needs the nvidia-dali-cuda130 package (pip install nvidia-dali-cuda130; "
            "it also runs without a GPU), or pass backend='baseline'"
        )
    for m in modalities:
        if m not in ("rgb", "flow"):
            raise ValueError(f"unknown modality {m!r}: choose from ('rgb', 'flow')")
    if "flow" in modalities and not reader.has_flow:
        raise ValueError(f"{reader.root} was preprocessed without flow (--flow none); it has only 'rgb'")


def build_pretrain_loader(root, *, split="1", subset="train", modalities=("rgb",), batch_size,
                          frames_per_clip=32, frame_stride=1, crop_size=128, pair_mode="same",
                          segments="quarters", num_segments=4, seed=0, rank=0, world_size=1, device="cpu",
                          device_id=None, num_threads=2, backend="dali", dtype=torch.float32,
                          num_workers=2, colour=True, hw_decoder_load=0.65, augment="standard", crop_scale_min=0.2,
                          videos=None):
    """A PretrainLoader; see the module docstring. `colour=False` keeps only crop and flip;
    `augment`: "standard" | "weak" | "coclr" per-copy strength (dali_pipelines.sampling);
    `crop_scale_min`: smallest area fraction of the random resized crop;
    `hw_decoder_load`: share of JPEGs sent to the GPU's hardware decoder (DALI on cuda only);
    `videos` (an addition, optional): names or indices of the subset's videos to sample from, as
    for `build_eval_loader` (the fine-tune trains on the train subset less its held-out videos)."""
    cfg = SamplingConfig(frames_per_clip=frames_per_clip, frame_stride=frame_stride, pair_mode=pair_mode,
                         segments=segments, num_segments=num_segments, seed=seed, colour=colour,
                         augment=augment, crop_scale_min=crop_scale_min)
    reader = ShardReader(root, split=split, subset=subset)
    if videos is not None:
        reader.videos = select_videos(reader, videos)
    modalities = tuple(modalities)
    _check(backend, device, modalities, reader)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside 0..{world_size - 1} (world_size={world_size})")
    if steps_per_epoch(len(reader.videos), batch_size, world_size) == 0:
        raise ValueError(f"{reader.root}: split {split} {subset}: {len(reader.videos)} videos give no full batch of "
                         f"{batch_size} per process with {world_size} process(es); lower the batch size or the processes")
    common = dict(batch_size=batch_size, crop_size=crop_size, modalities=modalities, rank=rank,
                  world_size=world_size, device=device, num_workers=num_workers, dtype=dtype)
    if backend == "baseline":
        from dali_pipelines.baseline import BaselinePretrainLoader

        return BaselinePretrainLoader(reader, cfg, **common)
    from dali_pipelines.pretrain import DaliPretrainLoader

    return DaliPretrainLoader(reader, cfg, device_id=device_id, num_threads=num_threads,
                              hw_decoder_load=hw_decoder_load, **common)


def build_eval_loader(root, *, split="1", subset="test", modality="rgb", frames_per_clip=32, window_stride=16,
                      crop_size=128, crops="center", batch_size=8, device="cpu", device_id=None, num_threads=2,
                      backend="dali", dtype=torch.float32, num_workers=2, videos=None):
    """An EvalLoader: every sliding window of every video once, in order; see the module docstring.
    `videos` (an addition, optional): names or indices of the subset's videos to decode, in that
    order; `EvalLoader.videos` is then that list (the fine-tune's held-out scoring uses it)."""
    if crops not in ("center", "ten"):
        raise ValueError(f"crops={crops!r}: choose 'center' or 'ten'")
    reader = ShardReader(root, split=split, subset=subset)
    _check(backend, device, (modality,), reader)
    source = EvalSource(reader, modality, frames_per_clip, window_stride, batch_size, crops == "ten",
                          videos)
    if backend == "baseline":
        from dali_pipelines.baseline import BaselineEvalLoader

        return BaselineEvalLoader(source, crop_size=crop_size, device=device, num_workers=num_workers, dtype=dtype)
    from dali_pipelines.evaluation import DaliEvalLoader

    return DaliEvalLoader(source, crop_size=crop_size, device=device, device_id=device_id, num_threads=num_threads,
                          num_workers=num_workers, dtype=dtype)
