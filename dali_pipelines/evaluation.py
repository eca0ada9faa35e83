"""The evaluation pipeline: every sliding window of every video, centre crop or ten crops.

docs/algorithm.md "Evaluation" (paper §3.2, CoCLR protocol): windows of T frames at `window_stride`,
no test-time jitter. The crop is a centre square of side round(224/240 * short side) resized to
`crop_size` (for 320x240 video exactly the paper's "centre 224, then resize to 128"); ten crops are
torchvision's TenCrop order: top-left, top-right, bottom-left, bottom-right, centre, then the same
five flipped (flow-x negated on those). Each frame is decoded once and cropped per position:

    batch = {"<modality>": [B, Ncrop, C, T, H, W], "video_index": Long[B], "label": Long[B]}

The last batch holds the remaining windows (it may be smaller than batch_size).
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
from dali_pipelines.source import FLOW_STD, EvalSource


def view_names(source: EvalSource) -> list[tuple[int, bool]]:
    """(crop position, flipped) of each output, in output order."""
    flips = (False, True) if source.ten_crop else (False,)
    return [(k, f) for f in flips for k in range(source.num_positions)]


@pipeline_def
def eval_pipeline(source: EvalSource, crop_size: int, device: str, dtype, parallel: bool, prefetch: int,
                  hw_decoder_load: float = 0.65):
    names = source.names()
    nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                               **source_kwargs(parallel, prefetch))))
    decoded = ops.decode_modality(nodes, "all", source.modality, device, hw_decoder_load)
    outputs = []
    for position, flipped in view_names(source):
        images = ops.crop_resize(decoded, nodes[f"roi_start:{position}"], nodes[f"roi_end:{position}"], crop_size)
        flow_std = [-FLOW_STD if flipped else FLOW_STD, FLOW_STD]
        outputs.append(ops.normalise(images, source.modality, int(flipped), dtype, flow_std))
    return tuple(outputs)


class DaliEvalLoader:
    """`cvtcl.data.EvalLoader` on DALI: a fresh pipeline per pass."""

    def __init__(self, source: EvalSource, *, crop_size: int, device: str, device_id, num_threads: int,
                 num_workers: int, dtype: torch.dtype, hw_decoder_load: float = 0.65):
        self.source, self.crop_size, self.device, self.device_id = source, crop_size, device, device_id
        self.num_threads, self.num_workers, self.dtype = num_threads, num_workers, dtype
        self.hw_decoder_load = hw_decoder_load
        self.videos = source.videos
        self._stream: DaliStream | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _build(self) -> DaliStream:
        pipe = eval_pipeline(
            source=self.source, crop_size=self.crop_size, hw_decoder_load=self.hw_decoder_load,
            **graph_kwargs(self.device, self.dtype, self.num_workers),
            **pipeline_kwargs(batch_size=self.source.batch_size * self.source.frames_per_clip, device=self.device,
                              device_id=self.device_id, num_threads=self.num_threads,
                              num_workers=self.num_workers),
        )
        return DaliStream(pipe, [f"view{i}" for i in range(len(view_names(self.source)))])

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __iter__(self) -> Iterator[dict]:
        self.close()  # a fresh pipeline per pass: a pass abandoned midway leaves nothing behind
        self._stream = self._build()
        t, m = self.source.frames_per_clip, self.source.modality
        for step in range(len(self.source)):
            data = self._stream.next(lambda: f"evaluation batch {step}", lambda: self._locate(step))
            windows = self.source.batch_windows(step)
            views = [data[f"view{i}"] for i in range(len(data))]
            yield {
                m: stack_clips(views, self.dtype, t, len(windows)),
                "video_index": torch.tensor([vi for vi, _ in windows], dtype=torch.long),
                "label": torch.tensor([self.videos[vi].label for vi, _ in windows], dtype=torch.long),
            }
        self.close()

    def _locate(self, step: int) -> str | None:
        def windows(iteration: int):  # past the last batch: no windows
            for video_index, frames in self.source.batch_windows(iteration):
                yield self.videos[video_index], frames

        return locate_undecodable(self.source.clips, (self.source.modality,), windows, step, self.num_workers)
