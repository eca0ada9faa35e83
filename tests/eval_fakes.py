"""Stand-ins for the loaders and the encoder, following the COMMON.md contracts, for evaluation tests.

`FakeEvalLoader` yields every sliding window of every video exactly once as
{"<modality>": [B, Ncrop, C, T, H, W], "video_index": [B], "label": [B]}; clip content is a
per-class channel pattern plus per-window noise, so a tiny encoder separates classes.
"""

from __future__ import annotations

import torch
from torch import nn

from preprocess.schema import CHANNELS, VideoRecord

# Tensors here are tiny: with 2 intra-op threads on a loaded 2-core machine each op spin-waits and
# a test runs ~100x slower (measured 1.8 s vs 0.006 s for one feature pass).
torch.set_num_threads(1)


def make_videos(num_classes=3, per_class=6, groups_per_class=3, frames=20, prefix="v") -> list[VideoRecord]:
    videos = []
    for label in range(num_classes):
        for i in range(per_class):
            group = f"C{label}_g{i % groups_per_class:02d}"
            videos.append(VideoRecord(name=f"{prefix}_C{label}_g{i % groups_per_class:02d}_c{i:02d}",
                                      class_name=f"C{label}", label=label, group=group,
                                      num_frames=frames + (i % 3) * 5, fps=25.0, height=8, width=8))
    return videos


def window_starts(num_frames: int, frames_per_clip: int, stride: int) -> list[int]:
    return list(range(0, max(num_frames - frames_per_clip, 0) + 1, stride))


class FakeEvalLoader:
    def __init__(self, videos, modality="rgb", frames_per_clip=8, window_stride=4, crops="center",
                 batch_size=3, size=6, noise=0.5, seed=0):
        self.videos = list(videos)
        self.modality, self.frames_per_clip, self.window_stride = modality, frames_per_clip, window_stride
        self.num_crops = 10 if crops == "ten" else 1
        self.batch_size, self.size, self.noise, self.seed = batch_size, size, noise, seed
        channels = CHANNELS[modality]
        generator = torch.Generator().manual_seed(1000 + seed)
        self.patterns = torch.randn(1 + max(v.label for v in self.videos), channels, generator=generator)

    def windows(self):
        for index, video in enumerate(self.videos):
            for start in window_starts(video.num_frames, self.frames_per_clip, self.window_stride):
                yield index, start

    def clip(self, index: int, start: int) -> torch.Tensor:
        """[Ncrop, C, T, H, W], deterministic in (seed, video, window start)."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + index * 131 + start)
        label = self.videos[index].label
        shape = (self.num_crops, len(self.patterns[label]), self.frames_per_clip, self.size, self.size)
        return self.patterns[label][None, :, None, None, None] + self.noise * torch.randn(shape, generator=generator)

    def __iter__(self):
        windows = list(self.windows())
        for first in range(0, len(windows), self.batch_size):
            chunk = windows[first : first + self.batch_size]
            yield {
                self.modality: torch.stack([self.clip(i, s) for i, s in chunk]),
                "video_index": torch.tensor([i for i, _ in chunk]),
                "label": torch.tensor([self.videos[i].label for i, _ in chunk]),
            }


class FakePretrainLoader:
    """PretrainLoader-like: `.epoch(e)` yields two copies per clip, [B, 2, C, T, H, W]."""

    def __init__(self, videos, modality="rgb", batch_size=4, frames_per_clip=8, size=6, noise=0.5, seed=0):
        self.videos = list(videos)
        self.modality, self.batch_size = modality, batch_size
        self.source = FakeEvalLoader(videos, modality, frames_per_clip, size=size, noise=noise, seed=seed)
        self.steps_per_epoch = len(self.videos) // batch_size
        self.seen: list[int] = []  # every video_index yielded, for tests

    def epoch(self, epoch: int, start_step: int = 0):
        order = torch.randperm(len(self.videos), generator=torch.Generator().manual_seed(epoch))
        for step in range(start_step, self.steps_per_epoch):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            clips = torch.stack([self.source.clip(int(i), epoch).expand(2, -1, -1, -1, -1) for i in rows])
            self.seen.extend(rows.tolist())
            yield {self.modality: clips, "video_index": rows, "group": rows,
                   "label": torch.tensor([self.videos[int(i)].label for i in rows])}


class TinyEncoder(nn.Module):
    """Encoder contract with a 1x1x1 conv backbone: features [N, F] = pooled ReLU(BN(conv(x)))."""

    def __init__(self, modality="rgb", feature_dim=16, embed_dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.modality, self.feature_dim = modality, feature_dim
        self.backbone = nn.Sequential(nn.Conv3d(CHANNELS[modality], feature_dim, 1), nn.BatchNorm3d(feature_dim),
                                      nn.ReLU())
        self.head = nn.Linear(feature_dim, embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean((2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.features(x)), dim=1)
