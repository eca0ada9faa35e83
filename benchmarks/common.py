"""Helpers shared by the benchmark scripts: the CPU's name (cvtcl.provenance's, as training records
it) and the toy shards they time loaders on.

Imported as `benchmarks.common`: every script has the repository root on sys.path (PYTHONPATH, or
its own sys.path insert), whether it runs as `python benchmarks/x.py` or a test imports it.
"""

from __future__ import annotations

from pathlib import Path

from cvtcl.provenance import cpu_name  # noqa: F401 (the benchmarks import it from here)


def write_toy_shards(root: str | Path, *, size: str, num_videos: int, frames: int, with_flow: bool = False) -> Path:
    """Toy shards (dali_pipelines.toy_shards) for a loader timing: `num_videos` moving videos of
    `size` ("HxW") frames, 8 more frames than a clip of `frames`, 64 videos per shard, JPEG quality 90."""
    from dali_pipelines.toy_shards import write_toy_dataset

    height, width = (int(v) for v in size.lower().split("x"))
    return write_toy_dataset(root, num_videos=num_videos, num_frames=frames + 8, height=height, width=width,
                             num_static=0, with_flow=with_flow, videos_per_shard=64, quality=90)
