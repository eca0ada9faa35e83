"""The baseline loader: a plain PyTorch DataLoader over the same shards, OpenCV decode and per-clip
augmentation in numpy/OpenCV (CoCLR-style). docs/design.md "Loader": it is the comparison point of
`benchmarks/loader_speed.py` and the fallback where DALI is not installed.

It consumes the same plans as the DALI pipelines (`sampling.py`, read through `source.ClipReader`)
and applies the same steps in the same order (frames.py): crop + resize (INTER_AREA when shrinking,
the closest OpenCV filter to DALI's antialiased linear resize; INTER_LINEAR when enlarging), the
colour affine map, clamp, Gaussian blur (same window), flip, normalisation. Batches have the
layout of the DALI loaders, so trainers cannot tell the two apart except by speed.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dali_pipelines.iterate import frozen_heap, worker_died
from dali_pipelines.sampling import (
    CopyAugment,
    SamplingConfig,
    batch_meta,
    eval_crops,
    plan_sample,
    steps_per_epoch,
)
from dali_pipelines.source import FLOW_MEAN, FLOW_STD, RGB_MEAN, RGB_STD, ClipReader, CorruptFrameError, EvalSource


def decode(clips: ClipReader, modality: str, video, frames: np.ndarray) -> np.ndarray:
    """[T, H, W, C] uint8: RGB (3 channels) or flow (x, y)."""
    decoded = {}
    for plane, bufs in clips.described(modality, video, frames).items():
        flag = cv2.IMREAD_COLOR if plane == "rgb" else cv2.IMREAD_GRAYSCALE
        images = []
        for description, buf in bufs:
            image = cv2.imdecode(buf, flag)
            if image is None:
                raise CorruptFrameError(f"{clips.reader.root}: {description} cannot be decoded; "
                                        "run `cvtcl-preprocess verify`")
            images.append(image[..., ::-1] if plane == "rgb" else image[..., None])
        decoded[plane] = np.stack(images)
    return decoded["rgb"] if modality == "rgb" else np.concatenate([decoded["flowx"], decoded["flowy"]], -1)


def crop_resize(frames: np.ndarray, crop: tuple[int, int, int, int], crop_size: int) -> np.ndarray:
    """[T, H, W, C] -> [T, S, S, C] uint8, the source-pixel crop (y0, x0, h, w) resized."""
    y0, x0, h, w = crop
    interp = cv2.INTER_AREA if h >= crop_size and w >= crop_size else cv2.INTER_LINEAR
    out = [cv2.resize(np.ascontiguousarray(f[y0 : y0 + h, x0 : x0 + w]), (crop_size, crop_size),
                      interpolation=interp) for f in frames]
    return np.stack(out).reshape(len(frames), crop_size, crop_size, frames.shape[-1])


def augment(frames: np.ndarray, aug: CopyAugment, crop_size: int, modality: str, colour: bool) -> np.ndarray:
    """One clip copy [T, H, W, C] uint8 -> normalised [C, T, S, S] float32 (frames.py, same order)."""
    x = crop_resize(frames, aug.crop, crop_size).astype(np.float32)
    if modality == "rgb" and colour:
        x = np.clip(x @ aug.colour[:, :3].T.astype(np.float32) + aug.colour[:, 3].astype(np.float32), 0, 255)
        if aug.blur_sigma > 0:
            k = aug.blur_window
            x = np.stack([cv2.GaussianBlur(f, (k, k), aug.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
                          for f in x])
    if aug.flip:
        x = x[:, :, ::-1]
    if modality == "rgb":
        x = (x - RGB_MEAN.astype(np.float32)) / RGB_STD.astype(np.float32)
    else:
        x = (x - FLOW_MEAN) / FLOW_STD
        if aug.flip:
            x[..., 0] = -x[..., 0]
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


class PretrainDataset(Dataset):
    """Item i = the i-th sample of (epoch, rank): {modality: [V, C, T, S, S], segments, meta}."""

    def __init__(self, reader, cfg: SamplingConfig, crop_size: int, modalities, epoch: int, rank: int,
                 world_size: int, length: int):
        self.clips, self.cfg, self.crop_size, self.modalities = ClipReader(reader), cfg, crop_size, modalities
        self.epoch, self.rank, self.world_size, self.length = epoch, rank, world_size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        videos = self.clips.reader.videos
        plan = plan_sample(videos, self.cfg, self.epoch, self.rank, self.world_size, index)
        video = videos[plan.video_index]
        item = {}
        for m in self.modalities:
            copies = []
            decoded = decode(self.clips, m, video, plan.frames[0])
            for v in (0, 1):
                if v == 1 and not np.array_equal(plan.frames[1], plan.frames[0]):
                    decoded = decode(self.clips, m, video, plan.frames[1])
                copies.append(augment(decoded, plan.augment[v], self.crop_size, m, self.cfg.colour))
            item[m] = np.stack(copies)
            if plan.segments is not None:
                seg = decode(self.clips, m, video, plan.segments.reshape(-1))
                item[f"{m}_segments"] = np.stack([
                    augment(seg, plan.augment[v], self.crop_size, m, self.cfg.colour)
                    .reshape(-1, self.cfg.num_segments, self.cfg.segment_length, self.crop_size, self.crop_size)
                    .transpose(1, 0, 2, 3, 4) for v in (0, 1)])
        return item


def _own_process_group(worker_id: int) -> None:
    """A DataLoader worker's init: leave the trainer's process group. torch's worker dies of a SIGTERM
    that its parent did not send, and torchrun's or a scheduler's SIGTERM goes to the whole process
    group, so the workers died under the trainer before it could checkpoint. Out of the group, only
    their parent signals them (its shutdown's terminate() still works, which ignoring SIGTERM would
    break: a worker that did not stop would hang the interpreter's exit), and they die with it in
    any case (preprocess/hygiene.py)."""
    os.setpgid(0, 0)


def start_workers(loader: DataLoader) -> Iterator:
    """iter(loader), which forks the loader's worker processes: under `frozen_heap`, as DALI's
    workers are, so a DALI pipeline left as garbage in this process (a DALI loader held in a
    reference cycle) is never collected in a worker, where its `__del__` hangs the worker and so
    the loader, for good. A worker that died (or shared memory that ran out) is one LoaderFailed."""
    context = loader.multiprocessing_context or multiprocessing
    with frozen_heap(loader.num_workers > 0 and context.get_start_method() == "fork"):
        batches = iter(loader)
    return _reporting(batches)


def _reporting(batches: Iterator) -> Iterator:
    try:
        yield from batches
    except RuntimeError as err:  # torch re-raises a worker's end as RuntimeError, its traceback inside
        died = worker_died("the baseline loader", str(err))
        if died is None:
            raise
        raise died from err


class BaselinePretrainLoader:
    """`cvtcl.data.PretrainLoader` on a torch DataLoader; same plans and layout as the DALI loader."""

    def __init__(self, reader, cfg: SamplingConfig, *, batch_size: int, crop_size: int, modalities, rank: int,
                 world_size: int, device: str, num_workers: int, dtype: torch.dtype):
        self.reader, self.cfg, self.batch_size, self.crop_size = reader, cfg, batch_size, crop_size
        self.modalities, self.rank, self.world_size = tuple(modalities), rank, world_size
        self.device, self.num_workers, self.dtype = device, num_workers, dtype
        self.videos = reader.videos
        self.steps_per_epoch = steps_per_epoch(len(self.videos), batch_size, world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        b = self.batch_size
        dataset = PretrainDataset(self.reader, self.cfg, self.crop_size, self.modalities, epoch, self.rank,
                                  self.world_size, self.steps_per_epoch * b)
        loader = DataLoader(dataset, batch_size=b, sampler=range(start_step * b, self.steps_per_epoch * b),
                            num_workers=self.num_workers, drop_last=True, pin_memory=self.device == "cuda",
                            worker_init_fn=_own_process_group)
        for step, batch in enumerate(start_workers(loader), start=start_step):
            out = {k: torch.as_tensor(a) for k, a in batch_meta(
                self.videos, self.reader.group_ids, self.cfg.seed, epoch, step, b, self.rank, self.world_size).items()}
            out.update({k: v.to(self.device, self.dtype, non_blocking=True) for k, v in batch.items()})
            yield out


class EvalDataset(Dataset):
    """Item i = window i of `EvalSource.windows`: {modality: [Ncrop, C, T, S, S], video_index, label}."""

    def __init__(self, source: EvalSource, crop_size: int):
        self.source, self.crop_size = source, crop_size

    def __len__(self) -> int:
        return len(self.source.windows)

    def __getitem__(self, index: int) -> dict:
        video_index, frames = self.source.windows[index]
        video = self.source.videos[video_index]
        m = self.source.modality
        decoded = decode(self.source.clips, m, video, frames)
        crops = eval_crops(video.height, video.width, self.source.ten_crop)
        flips = (False, True) if self.source.ten_crop else (False,)
        views = [augment(decoded, CopyAugment(c, f), self.crop_size, m, False) for f in flips for c in crops]
        return {m: np.stack(views), "video_index": video_index, "label": video.label}


class BaselineEvalLoader:
    """`cvtcl.data.EvalLoader` on a torch DataLoader."""

    def __init__(self, source: EvalSource, *, crop_size: int, device: str, num_workers: int, dtype: torch.dtype):
        self.source, self.crop_size, self.device, self.num_workers, self.dtype = source, crop_size, device, num_workers, dtype
        self.videos = source.videos

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(EvalDataset(self.source, self.crop_size), batch_size=self.source.batch_size,
                            num_workers=self.num_workers, pin_memory=self.device == "cuda",
                            worker_init_fn=_own_process_group)
        m = self.source.modality
        for batch in start_workers(loader):
            batch[m] = batch[m].to(self.device, self.dtype, non_blocking=True)
            yield batch
