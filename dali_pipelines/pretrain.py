"""The pretraining pipeline (two augmented copies of a clip, optional spread segments) and its loader.

docs/algorithm.md "Data per training sample", paper §2.1 (two augmentations of one clip) and §2.3
(local segments). One pipeline serves one modality or the two-stream case (rgb and flow of the same
frames, sharing crop and flip). Sampling and augmentation parameters come from `sampling.py` through
`source.PretrainSource`; this module only builds the DALI graph and assembles torch batches:

    batch = {"rgb": [B, V=2, 3, T, H, W], "flow": [B, 2, 2, T, H, W] (requested modalities),
             "video_index", "group", "label": Long[B],
             "<modality>_segments": [B, V, M, C, L, H, W] (segments="spread" only)}

The source stream is endless: batch k is (epoch, step) counted from where the pipeline was built,
so consecutive `epoch()` calls run on one pipeline and DALI prefetches across epoch boundaries. A
call that does not continue where the stream stands (resume, a jump) rebuilds the pipeline there.
"""

from __future__ import annotations

from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def

from dali_pipelines import frames as ops
from dali_pipelines.iterate import (
    DaliStream,
    graph_kwargs,
    locate_undecodable,
    pipeline_kwargs,
    source_kwargs,
    stack_clips,
)
from dali_pipelines.sampling import SamplingConfig, batch_meta, steps_per_epoch
from dali_pipelines.source import PretrainSource, group_windows


@pipeline_def
def pretrain_pipeline(source: PretrainSource, crop_size: int, device: str, dtype, parallel: bool,
                      prefetch: int, hw_decoder_load: float = 0.65):
    """Outputs, in `output_names(layout)` order: per modality, part and copy, [N = B * T, C, S, S]."""
    layout = source.layout
    names = layout.names()
    nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                               **source_kwargs(parallel, prefetch))))
    outputs = []
    for modality in layout.modalities:
        decoded = {g: ops.decode_modality(nodes, g, modality, device, hw_decoder_load) for g in layout.groups()}
        for part in layout.parts:
            for copy in (0, 1):
                arg = {k: nodes[f"{k}:{copy}"] for k in layout.arg_names()}
                images = ops.crop_resize(decoded[layout.group(part, copy)], arg["roi_start"], arg["roi_end"],
                                         crop_size)
                if modality == "rgb" and layout.colour:
                    images = ops.colour(images, arg["colour_m"], arg["colour_t"], arg["sigma"], arg["window"])
                outputs.append(ops.normalise(images, modality, arg["mirror"], dtype, arg.get("flow_std")))
    return tuple(outputs)


def output_names(layout) -> list[str]:
    return [f"{m}:{part}{v}" for m in layout.modalities for part in layout.parts for v in (0, 1)]


class DaliPretrainLoader:
    """`cvtcl.data.PretrainLoader` on DALI (CPU-only mode or GPU)."""

    def __init__(self, reader, cfg: SamplingConfig, *, batch_size: int, crop_size: int,
                 modalities: tuple[str, ...], rank: int, world_size: int, device: str, device_id,
                 num_threads: int, num_workers: int, dtype: torch.dtype, hw_decoder_load: float = 0.65):
        self.reader, self.cfg, self.batch_size, self.crop_size = reader, cfg, batch_size, crop_size
        self.modalities, self.rank, self.world_size = tuple(modalities), rank, world_size
        self.device, self.device_id, self.dtype = device, device_id, dtype
        self.num_threads, self.num_workers, self.hw_decoder_load = num_threads, num_workers, hw_decoder_load
        self.videos = reader.videos
        self.steps_per_epoch = steps_per_epoch(len(self.videos), batch_size, world_size)  # >= 1: cvtcl.data checks
        self._stream: DaliStream | None = None
        self._source: PretrainSource | None = None
        self._consumed = 0  # batches taken from the stream: it yields (epoch, step) source.position(_consumed) next

    def _build(self, epoch: int, step: int) -> None:
        self.close()
        source = PretrainSource(self.reader, self.cfg, self.batch_size, self.rank, self.world_size,
                                self.modalities, self.steps_per_epoch, epoch, step)
        pipe = pretrain_pipeline(
            source=source, crop_size=self.crop_size, hw_decoder_load=self.hw_decoder_load,
            **graph_kwargs(self.device, self.dtype, self.num_workers),
            **pipeline_kwargs(batch_size=self.batch_size * self.cfg.frames_per_clip, device=self.device,
                              device_id=self.device_id, num_threads=self.num_threads,
                              num_workers=self.num_workers, seed=self.cfg.seed),
        )
        self._stream = DaliStream(pipe, output_names(source.layout))
        self._source, self._consumed = source, 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = self._source = None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside 0..{self.steps_per_epoch}")
        for step in range(start_step, self.steps_per_epoch):
            if self._source is None or self._source.position(self._consumed) != (epoch, step):
                self._build(epoch, step)
            data = self._stream.next(lambda: f"epoch {epoch} step {step}", self._locate)
            self._consumed += 1
            yield self._assemble(data, epoch, step)

    def _assemble(self, data: dict, epoch: int, step: int) -> dict:
        b, t, m = self.batch_size, self.cfg.frames_per_clip, self.cfg.num_segments
        layout = self._source.layout
        batch = {k: torch.as_tensor(a) for k, a in batch_meta(
            self.videos, self.reader.group_ids, self.cfg.seed, epoch, step, b, self.rank, self.world_size).items()}
        for modality in self.modalities:
            for part in layout.parts:
                frames = [data[f"{modality}:{part}{v}"] for v in (0, 1)]
                if part == "clip":
                    batch[modality] = stack_clips(frames, self.dtype, t, b)
                else:
                    batch[f"{modality}_segments"] = stack_clips(frames, self.dtype, t // m, b, m)
        return batch

    def _locate(self) -> str | None:
        """On a DALI decode error: decode the batches in flight with OpenCV to name the bad frame."""
        source = self._source

        def windows(iteration: int):
            for plan in source.plans(iteration):
                for group in source.layout.groups():
                    for frames in group_windows(plan, group):
                        yield self.videos[plan.video_index], frames

        return locate_undecodable(source.clips, self.modalities, windows, self._consumed, self.num_workers)
