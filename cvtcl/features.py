"""Video-level features from a frozen encoder, the input of retrieval and the linear probe.

Paper §3.2 with the CoCLR protocol (docs/algorithm.md "Evaluation"): backbone features only (the
projection head is discarded), one feature per video = the mean of the features of all its
sliding windows (T = 32, stride 16), centre crop, no test-time jitter. The windows come from an
`EvalLoader` (`cvtcl.data.build_eval_loader`), which yields every window of every video exactly
once as `{"<modality>": [B, Ncrop, C, T, H, W], "video_index": [B], "label": [B]}`.

Random-init baselines are reported with batch norm in two modes (issue 6): `bn_mode="eval"` uses
the running statistics (for an untrained network: mean 0, var 1, i.e. no normalisation) and
`bn_mode="batch"` normalises each batch by its own statistics, which is what an untrained network
"sees" in training. Batch mode runs on a deep copy so the caller's running statistics never move.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from preprocess.schema import VideoRecord

BN_MODES = ("eval", "batch")


@dataclass
class VideoFeatures:
    """One row per video of the loader's `.videos`, in that order."""

    features: torch.Tensor  # [N, F] float32 on CPU
    labels: torch.Tensor  # [N] int64
    videos: list[VideoRecord]

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.videos]

    def subset(self, index: torch.Tensor) -> VideoFeatures:
        return VideoFeatures(self.features[index], self.labels[index], [self.videos[i] for i in index.tolist()])


class VideoAverager:
    """Running per-video mean of per-window rows (features or class probabilities).

    `add(video_index [B], values [B, X])` accumulates; `mean()` -> [N, X]. Refuses to average a
    video that received no window: that is a loader bug, not something to paper over with zeros.
    Sums are float64 on the CPU, in batch order (deterministic). Rows computed on a GPU wait there
    and come over `FLUSH_EVERY` batches at a time: a copy per batch would make the host wait for
    the GPU at every batch, leaving the GPU idle while the next batch is launched.
    """

    FLUSH_EVERY = 32  # batches held on a GPU before one copy to the host

    def __init__(self, num_videos: int, dim: int, flush_every: int = 1):
        self.sums = torch.zeros(num_videos, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_videos, dtype=torch.int64)
        self.flush_every = flush_every
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, video_index: torch.Tensor, values: torch.Tensor) -> None:
        self.pending.append((video_index.to("cpu", torch.int64), values.detach()))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = torch.cat([values for _, values in self.pending]).to("cpu", torch.float64)  # one copy
        for (video_index, _), part in zip(self.pending, rows.split([len(v) for _, v in self.pending])):
            self.sums.index_add_(0, video_index, part)  # the same additions, in the same order, as per batch
            self.counts.index_add_(0, video_index, torch.ones_like(video_index))
        self.pending.clear()

    def mean(self, where: str = "loader") -> torch.Tensor:
        self.flush()
        missing = (self.counts == 0).nonzero().flatten()
        if len(missing):
            raise RuntimeError(
                f"{where}: {len(missing)} of {len(self.counts)} videos got no window (first: index "
                f"{missing[0].item()}); the evaluation loader must yield every video at least once"
            )
        return (self.sums / self.counts[:, None]).float()


@contextlib.contextmanager
def inference_mode(module: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Yield the module to run inference with, restoring the caller's train/eval state afterwards.

    `bn_mode="eval"`: the module itself in eval mode. `bn_mode="batch"`: a deep copy in eval mode
    whose batch-norm layers use batch statistics (their running buffers change only in the copy).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    was_training = module.training
    target = module if bn_mode == "eval" else copy.deepcopy(module)
    target.eval()
    if bn_mode == "batch":
        for layer in target.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.train()
    try:
        with torch.no_grad():
            yield target
    finally:
        module.train(was_training)


def batch_modality(batch: dict[str, Any], modality: str | None) -> tuple[str, torch.Tensor]:
    """The clip tensor of an evaluation batch; `modality=None` picks the only one present."""
    if modality is None:
        present = [m for m in ("rgb", "flow") if m in batch]
        if len(present) != 1:
            raise KeyError(f"evaluation batch holds modalities {present}; pass modality= explicitly")
        modality = present[0]
    if modality not in batch:
        raise KeyError(f"evaluation batch has no {modality!r} clips (keys: {sorted(batch)}); "
                       f"build the loader with modality={modality!r}")
    return modality, batch[modality]


def loader_labels(loader: Any) -> torch.Tensor:
    """Labels [N] of `loader.videos` (the order every per-video tensor uses)."""
    return torch.tensor([v.label for v in loader.videos], dtype=torch.int64)


def iterate_windows(
    loader: Iterable[dict[str, Any]], modality: str | None, device: str | torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(clips [B * Ncrop, C, T, H, W] on `device`, video_index [B]) per batch, crops folded into N."""
    for batch in loader:
        _, clips = batch_modality(batch, modality)
        if clips.dim() != 6:
            raise ValueError(f"evaluation clips must be [B, Ncrop, C, T, H, W], got {tuple(clips.shape)}")
        yield clips.flatten(0, 1).to(device, non_blocking=True), batch["video_index"]


Log = Callable[[str], None]


def reporting(loader: Any, label: str, log: Log | None, every: float = 30.0) -> Iterator[dict[str, Any]]:
    """The loader's batches; with `log`, a line every `every` seconds (batches done, of how many,
    rate) and one at the end, so a pass of many minutes over a large dataset is not silent."""
    if log is None:
        yield from loader
        return
    total = f" of {len(loader)}" if hasattr(loader, "__len__") else ""
    start = last = time.perf_counter()
    for done, batch in enumerate(loader, 1):
        yield batch
        now = time.perf_counter()
        if now - last >= every:
            last = now
            log(f"{label}: batch {done}{total}, {done / (now - start):.2f} batches/s")
    count = len(loader.videos)
    log(f"{label}: {count} video{'s' if count != 1 else ''} in {time.perf_counter() - start:.1f} s")


def average_over_windows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Any,
    *,
    modality: str | None = None,
    device: str | torch.device = "cpu",
    label: str = "",
    log: Log | None = None,
) -> torch.Tensor:
    """Per-video mean over every window and crop of fn(clips [N, C, T, H, W]) -> [N, X]; -> [V, X].

    V = len(loader.videos). Averaging crops first and windows second equals the plain mean over
    all (window, crop) pairs, because every window of a loader has the same number of crops.
    `log`: progress lines named `label` (`reporting`).
    """
    averager: VideoAverager | None = None
    for clips, video_index in iterate_windows(reporting(loader, label, log), modality, device):
        rows = fn(clips).float()  # [B * Ncrop, X]
        rows = rows.view(len(video_index), -1, rows.shape[-1]).mean(1)  # [B, X]
        if averager is None:
            averager = VideoAverager(len(loader.videos), rows.shape[-1],
                                     flush_every=1 if rows.device.type == "cpu" else VideoAverager.FLUSH_EVERY)
        averager.add(video_index, rows)
    if averager is None:
        raise RuntimeError("the evaluation loader yielded no batch; is its split subset empty?")
    return averager.mean()


def extract_features(
    encoder: nn.Module,
    loader: Any,
    *,
    modality: str | None = None,
    device: str | torch.device = "cpu",
    bn_mode: str = "eval",
    label: str = "features",
    log: Log | None = None,
) -> VideoFeatures:
    """Per-video backbone features [V, F]: the mean over every window (and crop) the loader yields.

    Crops are averaged too, so a ten-crop loader gives the ten-crop mean feature; retrieval and the
    linear probe use centre-crop loaders.
    """
    with inference_mode(encoder, bn_mode) as model:
        features = average_over_windows(model.features, loader, modality=modality, device=device, label=label,
                                        log=log)
    return VideoFeatures(features, loader_labels(loader), list(loader.videos))
