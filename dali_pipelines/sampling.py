"""Which frames each training sample reads and how each clip copy is augmented (numpy only).

docs/algorithm.md "Data per training sample" (paper §2.1, §2.3). Every plan is a pure function of
(seed, epoch, rank, index): the DALI source and the baseline loader call the same functions, so the
two backends see the same videos, frames, crops, flips and colours, and a run resumed at
(epoch, step) reproduces the rest of the epoch exactly.

Choices where the spec is silent (documented in the README as well):
- Epoch order: one permutation of the videos per (seed, epoch), cut into `world_size` contiguous
  equal parts; the remainder (fewer than `world_size` videos) and the last partial batch of each
  rank are dropped, so every rank runs the same number of steps.
- Temporal window: T frames at `frame_stride`; the start is uniform over every legal start
  (0 .. n - 1 - (T - 1) * stride, that is n - T for stride 1). A video shorter than
  the window is padded by repeating its first frame at the front (CoCLR's rule).
- Flow: the flow of frames i .. i + T - 1 is flow frames i .. i + T - 1 (flow frame i is the motion
  from frame i to i + 1); a video of n frames has n - 1 flow frames, so index n - 1 is clamped to
  n - 2 (the last flow frame repeats once when a window ends on the last frame).
- Colour jitter (0.4, 0.4, 0.4, 0.1), grayscale and the order of the four jitter operations are
  composed into one affine map on RGB in [0, 255]: brightness scales, contrast pivots around
  mid-grey (128) rather than torchvision's per-image mean (that would need the decoded frame),
  saturation blends with the luma (0.299, 0.587, 0.114), hue rotates the chroma plane of YIQ
  (torchvision rotates in HSV, which is not linear). Values are clamped once, after the map.
- Augmentation strength (`augment`; docs/algorithm.md, "Data per training sample"):
  CoCLR has two transforms, "strong" (its base transform, the list in docs/algorithm.md: crop + flip
  + jitter + grayscale + blur) and "weak" (crop + flip only), and a controller that mixes them per copy.
  "standard" gives every copy the strong list (the paper's setting), "weak" every copy crop + flip,
  "coclr" CoCLR's controller: copies of one window get one strong and one weak copy (which one at
  random), copies of two windows are each strong with p = 0.3. Crops, flips and frames do not
  depend on `augment` (the colour/blur draws always happen; a weak copy drops them).
"""

from __future__ import annotations

import math
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PAIR_MODES = ("same", "independent", "coclr")
AUGMENTS = ("standard", "weak", "coclr")
COCLR_STRONG_P = 0.3  # CoCLR's TwoClipTransform: chance that a copy of a two-window pair is strong
SEGMENT_MODES = ("quarters", "spread")
LUMA = np.array([0.299, 0.587, 0.114])
_GRAY = np.outer(np.ones(3), LUMA)  # RGB -> its luma in every channel
# RGB -> YIQ and back: hue is a rotation of the (I, Q) plane, a linear operation on RGB.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


@dataclass(frozen=True)
class SamplingConfig:
    """What a pretraining sample is; validated on construction."""

    frames_per_clip: int = 32  # T, frames of one clip copy
    frame_stride: int = 1  # distance between consecutive sampled frames
    pair_mode: str = "same"  # how the two copies relate in time: same | independent | coclr
    segments: str = "quarters"  # local segments: quarters (slices of the clip) | spread (TSN-style)
    num_segments: int = 4  # M; L = T / M frames per segment
    seed: int = 0
    colour: bool = True  # colour jitter / grayscale / blur on RGB; off for crop+flip only (tests, flow)
    augment: str = "standard"  # strong list on every copy | weak (crop + flip) | coclr (strong/weak mix)
    crop_scale_min: float = 0.2  # smallest area fraction of the random resized crop (torchvision: 0.08; CoCLR: 0.2)

    def __post_init__(self):
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min={self.crop_scale_min} must be in (0, 1]")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment={self.augment!r}: choose one of {AUGMENTS}")
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode={self.pair_mode!r}: choose one of {PAIR_MODES}")
        if self.segments not in SEGMENT_MODES:
            raise ValueError(f"segments={self.segments!r}: choose one of {SEGMENT_MODES}")
        if self.segments == "quarters" and self.pair_mode != "same":
            raise ValueError(
                f"segments='quarters' needs pair_mode='same' (segment j of both copies must hold the same "
                f"frames), got pair_mode={self.pair_mode!r}; use segments='spread' or pair_mode='same'"
            )
        if self.frames_per_clip < 1 or self.frame_stride < 1 or self.num_segments < 1:
            raise ValueError("frames_per_clip, frame_stride and num_segments must be positive")
        if self.frames_per_clip % self.num_segments:
            raise ValueError(
                f"frames_per_clip={self.frames_per_clip} is not divisible by num_segments={self.num_segments}"
            )

    @property
    def segment_length(self) -> int:
        return self.frames_per_clip // self.num_segments


@dataclass(frozen=True)
class CopyAugment:
    """Augmentation of one clip copy, shared by all its frames (and by rgb and flow of a sample)."""

    crop: tuple[int, int, int, int]  # y0, x0, height, width in source pixels
    flip: bool
    colour: np.ndarray = field(default_factory=lambda: identity_colour())  # [3, 4] affine on RGB 0..255
    blur_sigma: float = 0.0  # 0 = no blur

    @property
    def blur_window(self) -> int:
        """Kernel width used by both backends: 2 * ceil(3 sigma) + 1, 1 (identity) without blur."""
        return 2 * math.ceil(3 * self.blur_sigma) + 1 if self.blur_sigma > 0 else 1


@dataclass(frozen=True)
class SamplePlan:
    """One training sample: which video, which frames per copy, how each copy is augmented."""

    video_index: int
    frames: np.ndarray  # [V, T] frame indices per copy
    augment: tuple[CopyAugment, CopyAugment]
    segments: np.ndarray | None = None  # [M, L] frame indices (spread only; same for both copies)


def identity_colour() -> np.ndarray:
    return np.hstack([np.eye(3), np.zeros((3, 1))])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_videos: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of every video, drawn once (every sample of a batch asks for it)."""
    order = _rng(seed, epoch, 0).permutation(num_videos)
    order.flags.writeable = False  # shared by the cache's callers
    return order


def rank_order(num_videos: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Video indices this rank visits in `epoch`: its contiguous part of the epoch's permutation
    (a read-only view)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside 0..{world_size - 1}")
    per_rank = num_videos // world_size
    return _epoch_permutation(num_videos, seed, epoch)[rank * per_rank : (rank + 1) * per_rank]


def steps_per_epoch(num_videos: int, batch_size: int, world_size: int) -> int:
    return (num_videos // world_size) // batch_size


def batch_meta(videos, group_ids: dict, seed: int, epoch: int, step: int, batch_size: int, rank: int,
               world_size: int) -> dict[str, np.ndarray]:
    """video_index / group / label (int64 [B]) of a batch, straight from the epoch order."""
    order = rank_order(len(videos), seed, epoch, rank, world_size)[step * batch_size : (step + 1) * batch_size]
    return {
        "video_index": order.astype(np.int64),
        "group": np.array([group_ids[videos[i].group] for i in order], dtype=np.int64),
        "label": np.array([videos[i].label for i in order], dtype=np.int64),
    }


def window(num_frames: int, length: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """`length` frame indices at `stride`, start uniform over every legal start; a short video is
    padded by repeating its first frame at the front."""
    span = (length - 1) * stride + 1
    pad = max(0, span - num_frames)
    start = int(rng.integers(0, num_frames + pad - span + 1))
    return np.maximum(start + stride * np.arange(length) - pad, 0)


def spread_segments(num_frames: int, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """[M, L] indices: the (front-padded) video cut into M equal spans, one L-frame window in each.

    Windows of different spans never overlap; in a short video the padded positions repeat frame 0.
    """
    m, length, stride = cfg.num_segments, cfg.segment_length, cfg.frame_stride
    span = (length - 1) * stride + 1
    pad = max(0, m * span - num_frames)
    total = num_frames + pad
    bounds = [(j * total) // m for j in range(m + 1)]
    rows = []
    for j in range(m):
        start = bounds[j] + int(rng.integers(0, bounds[j + 1] - bounds[j] - span + 1))
        rows.append(np.maximum(start + stride * np.arange(length) - pad, 0))
    return np.stack(rows)


def random_resized_crop(height: int, width: int, rng: np.random.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (y0, x0, h, w); centre crop after `tries` misses."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def colour_jitter(rng: np.random.Generator, strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8,
                  p_gray=0.2) -> np.ndarray:
    """[3, 4] affine map (A | t) on RGB in [0, 255]: jitter in a random order (p 0.8), then grayscale (p 0.2)."""
    b, c, s, h = strength
    ops = []
    if rng.random() < p_jitter:
        bright = rng.uniform(1 - b, 1 + b)
        contrast = rng.uniform(1 - c, 1 + c)
        sat = rng.uniform(1 - s, 1 + s)
        hue = rng.uniform(-h, h) * 2 * math.pi
        rot = np.array([[1, 0, 0], [0, math.cos(hue), -math.sin(hue)], [0, math.sin(hue), math.cos(hue)]])
        jitters = [
            (bright * np.eye(3), np.zeros(3)),
            (contrast * np.eye(3), (1 - contrast) * 128.0 * np.ones(3)),
            (sat * np.eye(3) + (1 - sat) * _GRAY, np.zeros(3)),
            (_YIQ_INV @ rot @ _YIQ, np.zeros(3)),
        ]
        ops = [jitters[i] for i in rng.permutation(4)]
    if rng.random() < p_gray:
        ops.append((_GRAY, np.zeros(3)))
    mat, off = np.eye(3), np.zeros(3)
    for a, t in ops:  # compose: x -> a (mat x + off) + t
        mat, off = a @ mat, a @ off + t
    return np.hstack([mat, off[:, None]])


def copy_augment(height: int, width: int, colour: bool, rng: np.random.Generator,
                 scale_min: float = 0.2) -> CopyAugment:
    """Crop (area fraction in [scale_min, 1]), flip, colour and blur of one copy. The colour draws
    happen even with colour=False, so switching colour off keeps every crop and flip (tests compare
    the two)."""
    crop = random_resized_crop(height, width, rng, scale=(scale_min, 1.0))
    flip = bool(rng.random() < 0.5)
    matrix = colour_jitter(rng)
    sigma = float(rng.uniform(0.1, 2.0)) if rng.random() < 0.5 else 0.0
    return CopyAugment(crop, flip, matrix, sigma) if colour else CopyAugment(crop, flip)


def copy_strengths(augment: str, one_window: bool, rng: np.random.Generator) -> tuple[bool, bool]:
    """Whether each of the two copies gets the strong list (True) or crop + flip only."""
    if augment == "standard":
        return True, True
    if augment == "weak":
        return False, False
    if one_window:  # CoCLR's OneClipTransform: one strong and one weak view of the same frames
        first = bool(rng.random() < 0.5)
        return first, not first
    return bool(rng.random() < COCLR_STRONG_P), bool(rng.random() < COCLR_STRONG_P)


def plan_sample(videos, cfg: SamplingConfig, epoch: int, rank: int, world_size: int, index: int) -> SamplePlan:
    """The `index`-th sample of `rank` in `epoch` (videos: the loader's VideoRecord list)."""
    video_index = int(rank_order(len(videos), cfg.seed, epoch, rank, world_size)[index])
    video = videos[video_index]
    rng = _rng(cfg.seed, epoch, 1, rank, index)
    n, t, stride = video.num_frames, cfg.frames_per_clip, cfg.frame_stride
    first = window(n, t, stride, rng)
    independent = cfg.pair_mode == "independent" or (cfg.pair_mode == "coclr" and rng.random() < 0.5)
    second = window(n, t, stride, rng) if independent else first
    segments = spread_segments(n, cfg, rng) if cfg.segments == "spread" else None
    # strength draws use their own stream, so "standard" plans are those of before the option existed
    strong = copy_strengths(cfg.augment, not independent, _rng(cfg.seed, epoch, 2, rank, index))
    augment = tuple(copy_augment(video.height, video.width, cfg.colour and s, rng,
                                 cfg.crop_scale_min) for s in strong)
    return SamplePlan(video_index, np.stack([first, second]), augment, segments)


def plan_batch(videos, cfg: SamplingConfig, epoch: int, step: int, batch_size: int, rank: int,
               world_size: int) -> list[SamplePlan]:
    return [plan_sample(videos, cfg, epoch, rank, world_size, step * batch_size + i) for i in range(batch_size)]


def flow_indices(frames: np.ndarray, num_frames: int, name: str = "") -> np.ndarray:
    """Flow frame of each RGB frame index: the same index, the last frame clamped to n - 2."""
    if num_frames < 2:  # the training and evaluation checks refuse such videos before any work
        raise ValueError(f"video {name} has {num_frames} frame(s), so no flow; drop it from the flow dataset")
    return np.minimum(frames, num_frames - 2)


# Evaluation: deterministic windows and crops (docs/algorithm.md "Evaluation").
EVAL_CROP_FRACTION = 224 / 240  # the paper's centre 224 of a 240-pixel-high frame


class EvalWindows(Sequence):
    """(video index, [T] frame indices) of every sliding window of every video, in order: starts
    0, stride, 2*stride, ... while a whole window fits (the last < stride frames may be in none);
    a video shorter than one window gives one front-padded window.

    Held as int32 arrays (video, first frame; each video's padding), the frame indices made per
    item: a Kinetics train pass has 3.7 M windows, 1.6 GB as a list of index arrays, and a copy of
    it in each spawned DALI worker (4 GB once unpickled there); 30 MB this way."""

    def __init__(self, videos, frames_per_clip: int, window_stride: int):
        counts = [len(range(0, max(v.num_frames - frames_per_clip, 0) + 1, window_stride)) for v in videos]
        self.video = np.repeat(np.arange(len(videos), dtype=np.int32), counts)
        first = np.cumsum([0, *counts], dtype=np.int64)[:-1]  # each video's first window
        self.start = ((np.arange(len(self.video)) - np.repeat(first, counts)) * window_stride).astype(np.int32)
        self.pad = np.array([max(0, frames_per_clip - v.num_frames) for v in videos], dtype=np.int32)
        self.frames_per_clip = frames_per_clip

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        video = int(self.video[index])  # IndexError past the end: iteration stops there
        return video, np.maximum(self.start[index] + np.arange(self.frames_per_clip) - self.pad[video], 0)


def eval_windows(videos, frames_per_clip: int, window_stride: int) -> EvalWindows:
    """Every sliding window of every video, in order (`EvalWindows`)."""
    return EvalWindows(videos, frames_per_clip, window_stride)


def eval_crops(height: int, width: int, ten: bool,
               fraction: float = EVAL_CROP_FRACTION) -> list[tuple[int, int, int, int]]:
    """Square crops (y0, x0, h, w) of side round(fraction * short side): the centre, or torchvision's
    TenCrop positions top-left, top-right, bottom-left, bottom-right, centre (flips are added by
    the caller, in the same order)."""
    side = max(1, int(round(fraction * min(height, width))))
    cy, cx = (height - side) // 2, (width - side) // 2
    centre = (cy, cx, side, side)
    if not ten:
        return [centre]
    return [(0, 0, side, side), (0, width - side, side, side), (height - side, 0, side, side),
            (height - side, width - side, side, side), centre]
