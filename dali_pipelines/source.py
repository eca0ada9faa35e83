"""Batch sources for DALI's parallel `fn.external_source`: encoded frames plus per-frame arguments.

docs/design.md "Loader". A source is a picklable callable `source(batch_info) -> tuple of outputs`;
DALI runs it in worker processes (`parallel=True, batch=True`), where the ShardReader opens its
HDF5 files lazily (never before the fork). Batch mode, not per-sample mode: one worker produces a
whole batch with ONE contiguous read per clip window (a per-frame sample source would read frame by
frame); the workers only read bytes and compute plans, the decoding and augmentation run in DALI.

Every frame is one DALI sample (DALI 2.4's image decoder silently decodes only the first frame of
a sequence), so each output is a batch of N = B * T frames, and the per-clip augmentation is
repeated per frame: all frames of a clip copy share crop, flip, colour and blur by construction.

Corrupt data: the ShardReader checks every frame's crc32 (layout version 2) as it reads it, and
every frame must start with the JPEG SOI marker and end with EOI; otherwise the source raises
`CorruptFrameError` naming shard root, video, modality and frame, and DALI re-raises it from the
iterator (checked in tests). The DALI CPU and GPU paths and the baseline loader all read through
`ClipReader`, so all of them check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dali_pipelines.sampling import (
    SamplePlan,
    SamplingConfig,
    eval_crops,
    eval_windows,
    flow_indices,
    plan_batch,
)
from preprocess.schema import CorruptFrameError  # noqa: F401 (raised here, re-exported to the loaders)

PLANES = {"rgb": ("rgb",), "flow": ("flowx", "flowy")}
RGB_MEAN = np.array([0.485, 0.456, 0.406]) * 255
RGB_STD = np.array([0.229, 0.224, 0.225]) * 255
FLOW_MEAN, FLOW_STD = 128.0, 128.0  # (u8 - 128) / 128 ~ flow / 20: schema.FLOW_ZERO, schema.FLOW_SCALE


class ClipReader:
    """Encoded frames of a window, one contiguous shard read per window, checked for JPEG markers."""

    def __init__(self, reader):
        self.reader = reader  # preprocess.shards.ShardReader (picklable, lazy handles)

    def _check(self, buf: np.ndarray, video, frame: int, what: str) -> np.ndarray:
        if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8 or buf[-2] != 0xFF or buf[-1] != 0xD9:
            raise CorruptFrameError(
                f"{self.reader.root}: video {video.name} {what} frame {frame} (shard {video.shard}) is not a "
                f"complete JPEG ({len(buf)} bytes); run `cvtcl-preprocess verify {self.reader.root}` and "
                "re-run preprocessing for that video"
            )
        return buf

    def rgb(self, video, frames: np.ndarray) -> list[np.ndarray]:
        lo, hi = int(frames.min()), int(frames.max())
        chunk = self.reader.read_rgb(video, lo, hi - lo + 1)
        return [self._check(chunk[f - lo], video, int(f), "rgb") for f in frames]

    def flow(self, video, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(x planes, y planes) of the flow at the given RGB frame indices (sampling.flow_indices)."""
        idx = flow_indices(frames, video.num_frames, video.name)
        lo, hi = int(idx.min()), int(idx.max())
        chunk = self.reader.read_flow(video, lo, hi - lo + 1)
        xs = [self._check(chunk[f - lo][0], video, int(f), "flow-x") for f in idx]
        ys = [self._check(chunk[f - lo][1], video, int(f), "flow-y") for f in idx]
        return xs, ys

    def planes(self, modality: str, video, frames: np.ndarray) -> dict[str, list[np.ndarray]]:
        if modality == "rgb":
            return {"rgb": self.rgb(video, frames)}
        xs, ys = self.flow(video, frames)
        return {"flowx": xs, "flowy": ys}

    def described(self, modality: str, video, frames: np.ndarray) -> dict[str, list[tuple[str, np.ndarray]]]:
        """`planes`, each buffer with its name for an error: "video V flow-x frame F", F the stored
        frame (for flow the clamped index sampling.flow_indices reads, not the RGB frame asked for)."""
        stored = frames if modality == "rgb" else flow_indices(frames, video.num_frames, video.name)
        return {plane: [(f"video {video.name} {_PLANE_NAMES[plane]} frame {int(f)}", buf) for f, buf in zip(stored, bufs)]
                for plane, bufs in self.planes(modality, video, frames).items()}


_PLANE_NAMES = {"rgb": "rgb", "flowx": "flow-x", "flowy": "flow-y"}  # as the checks above name them


@dataclass(frozen=True)
class PretrainLayout:
    """Names and order of a pretraining source's outputs, shared by the source and the graph.

    parts: "clip" (T frames per copy) and, for segments="spread", "segments" (M * L frames).
    A part is decoded once and augmented twice when both copies hold the same frames (pair mode
    `same` for the clip, always for spread segments): half the decoding of the naive layout.
    """

    modalities: tuple[str, ...]
    pair_mode: str
    segments: str
    colour: bool = True  # RGB colour/blur arguments present (SamplingConfig.colour)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("clip", "segments") if self.segments == "spread" else ("clip",)

    def shared(self, part: str) -> bool:
        return part == "segments" or self.pair_mode == "same"

    def group(self, part: str, copy: int) -> str:
        return part if self.shared(part) else f"{part}{copy}"

    def groups(self) -> list[str]:
        return sorted({self.group(p, v) for p in self.parts for v in (0, 1)})

    def names(self) -> list[str]:
        names = [f"{plane}:{g}" for m in self.modalities for plane in PLANES[m] for g in self.groups()]
        for v in (0, 1):  # M * L = T: the clip and its segments share per-frame arguments
            names += [f"{arg}:{v}" for arg in self.arg_names()]
        return names

    def arg_names(self) -> list[str]:
        args = ["roi_start", "roi_end", "mirror"]
        if "rgb" in self.modalities and self.colour:
            args += ["colour_m", "colour_t", "sigma", "window"]
        if "flow" in self.modalities:
            args += ["flow_std"]
        return args


def copy_args(plans: list[SamplePlan], copy: int, frames_per_sample: int, with_colour: bool,
              with_flow: bool) -> dict[str, np.ndarray]:
    """Per-frame DALI argument arrays (leading dim N = B * frames_per_sample) for one clip copy."""
    augs = [p.augment[copy] for p in plans]
    crops = np.array([a.crop for a in augs], dtype=np.float32)  # [B, 4] y0, x0, h, w
    per_sample = {
        "roi_start": crops[:, :2],
        "roi_end": crops[:, :2] + crops[:, 2:],
        "mirror": np.array([a.flip for a in augs], dtype=np.int32),
    }
    if with_colour:
        colour = np.stack([a.colour for a in augs]).astype(np.float32)
        per_sample.update(
            colour_m=colour[:, :, :3].copy(),
            colour_t=colour[:, :, 3].copy(),
            sigma=np.array([max(a.blur_sigma, 1e-3) for a in augs], dtype=np.float32),
            window=np.array([a.blur_window for a in augs], dtype=np.int32),
        )
    if with_flow:  # flow-x is negated exactly on flipped clips via a negative std
        sign = np.where(per_sample["mirror"] == 1, -1.0, 1.0)
        per_sample["flow_std"] = np.stack([FLOW_STD * sign, np.full_like(sign, FLOW_STD)], 1).astype(np.float32)
    return {k: np.repeat(v, frames_per_sample, axis=0) for k, v in per_sample.items()}


def group_windows(plan: SamplePlan, group: str) -> list[np.ndarray]:
    """The frame windows of a decode group ("clip", "clip0", "clip1", "segments"), one read each."""
    if group == "segments":
        return list(plan.segments)  # M windows of L frames: M * L = T frames per sample
    return [plan.frames[int(group[4:] or 0)]]


class PretrainSource:
    """Batch `k` of the stream = (epoch, step) counted on from (start_epoch, start_step)."""

    def __init__(self, reader, cfg: SamplingConfig, batch_size: int, rank: int, world_size: int,
                 modalities: tuple[str, ...], steps_per_epoch: int, start_epoch: int = 0, start_step: int = 0):
        self.clips = ClipReader(reader)
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.modalities, self.steps = tuple(modalities), steps_per_epoch
        self.start = start_epoch * steps_per_epoch + start_step
        self.layout = PretrainLayout(self.modalities, cfg.pair_mode, cfg.segments, cfg.colour)

    def position(self, iteration: int) -> tuple[int, int]:
        return divmod(self.start + iteration, self.steps)

    def plans(self, iteration: int) -> list[SamplePlan]:
        epoch, step = self.position(iteration)
        return plan_batch(self.clips.reader.videos, self.cfg, epoch, step, self.batch_size, self.rank,
                          self.world_size)

    def __call__(self, batch_info) -> tuple:
        iteration = batch_info if isinstance(batch_info, int) else batch_info.iteration
        plans = self.plans(iteration)
        videos = self.clips.reader.videos
        out: dict[str, list[np.ndarray] | np.ndarray] = {}
        for group in self.layout.groups():
            for plan in plans:
                video = videos[plan.video_index]
                for frames in group_windows(plan, group):
                    for m in self.modalities:
                        for plane, bufs in self.clips.planes(m, video, frames).items():
                            out.setdefault(f"{plane}:{group}", []).extend(bufs)
        for v in (0, 1):
            args = copy_args(plans, v, self.cfg.frames_per_clip, "colour_m" in self.layout.arg_names(),
                             "flow" in self.modalities)
            out.update({f"{k}:{v}": a for k, a in args.items()})
        return tuple(out[name] for name in self.layout.names())


def select_videos(reader, videos) -> list:
    """The reader's VideoRecords named by `videos` (names or indices into `reader.videos`), in the
    given order; None keeps them all."""
    if videos is None:
        return list(reader.videos)
    by_name = {v.name: i for i, v in enumerate(reader.videos)}
    picked = []
    for item in videos:
        index = item if isinstance(item, (int, np.integer)) else by_name.get(item)
        if index is None or not 0 <= index < len(reader.videos):
            raise ValueError(f"{reader.root}: video {item!r} is not in this split/subset "
                             f"({len(reader.videos)} videos); pass names or indices of `loader.videos`")
        picked.append(int(index))
    if len(set(picked)) != len(picked):
        raise ValueError(f"{reader.root}: videos= names a video twice; each window must come once")
    return [reader.videos[i] for i in picked]


class EvalSource:
    """Batches of `batch_size` sliding windows; each crop position gets its own ROI arguments.
    `videos` (a `select_videos` list) restricts the pass; `video_index` indexes `self.videos`."""

    def __init__(self, reader, modality: str, frames_per_clip: int, window_stride: int, batch_size: int,
                 ten_crop: bool, videos=None):
        self.clips = ClipReader(reader)
        self.modality, self.batch_size, self.ten_crop = modality, batch_size, ten_crop
        self.frames_per_clip = frames_per_clip
        self.videos = select_videos(reader, videos)
        self.windows = eval_windows(self.videos, frames_per_clip, window_stride)
        self.num_positions = 5 if ten_crop else 1

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def names(self) -> list[str]:
        names = [f"{plane}:all" for plane in PLANES[self.modality]]
        for k in range(self.num_positions):
            names += [f"roi_start:{k}", f"roi_end:{k}"]
        return names

    def batch_windows(self, iteration: int) -> list[tuple[int, np.ndarray]]:
        return self.windows[iteration * self.batch_size : (iteration + 1) * self.batch_size]

    def __call__(self, batch_info) -> tuple:
        iteration = batch_info if isinstance(batch_info, int) else batch_info.iteration
        if iteration >= len(self):
            raise StopIteration
        out: dict[str, list] = {}
        for video_index, frames in self.batch_windows(iteration):
            video = self.videos[video_index]
            for plane, bufs in self.clips.planes(self.modality, video, frames).items():
                out.setdefault(f"{plane}:all", []).extend(bufs)
            for k, (y0, x0, h, w) in enumerate(eval_crops(video.height, video.width, self.ten_crop)):
                out.setdefault(f"roi_start:{k}", []).append([y0, x0])
                out.setdefault(f"roi_end:{k}", []).append([y0 + h, x0 + w])
        t = self.frames_per_clip
        for k in range(self.num_positions):
            for key in (f"roi_start:{k}", f"roi_end:{k}"):
                out[key] = np.repeat(np.array(out[key], dtype=np.float32), t, axis=0)
        return tuple(out[name] for name in self.names())
