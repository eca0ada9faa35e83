"""Test doubles for the trainer: a tiny real dataset directory and an in-memory pretrain loader.

`FakePretrainLoader` follows the `cvtcl.data.build_pretrain_loader` contract (COMMON.md) with
synthetic tensors instead of decoded frames: each video is a fixed smooth random clip, each
copy adds independent noise, and everything is a pure function of (seed, epoch, rank, step), so
resume determinism and multi-rank tests behave as with the real loader. `make_dataset` writes a
small but real manifest and shard (the trainer validates those before any work).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preprocess.schema import Manifest, VideoRecord, shard_name, write_json_atomic
from preprocess.shards import EncodedVideo, ShardReader, shard_entry, write_shard

CHANNELS = {"rgb": 3, "flow": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: on 2 shared cores OpenMP spinning makes 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(root: Path, num_videos: int = 16, num_frames: int = 4, with_flow: bool = True) -> Path:
    """A real dataset directory (manifest + one shard of 8x8 JPEGs); 4 classes, 2 groups each."""
    root.mkdir(parents=True, exist_ok=True)
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    plane = cv2.imencode(".jpg", np.full((8, 8), 128, np.uint8))[1].tobytes()
    videos = []
    for i in range(num_videos):
        label, group = i % 4, i % 8
        record = VideoRecord(f"v_C{label}_g{group:02d}_c{i:02d}", f"C{label}", label, f"C{label}_g{group:02d}",
                             num_frames, 25.0, 8, 8)
        videos.append(EncodedVideo(record, [jpeg] * num_frames, [(plane, plane)] * (num_frames - 1) if with_flow else None))
    records = write_shard(root / shard_name(0), 0, videos, [], with_flow)
    names = [r.name for r in records]
    manifest = Manifest("fake", {"flow": {"backend": "fake" if with_flow else "none"}}, [f"C{i}" for i in range(4)],
                        [shard_entry(root / shard_name(0), records)], records, {"1": {"train": names, "test": names[:4]}})
    write_json_atomic(root / "manifest.json", manifest.to_dict())
    return root


class FakePretrainLoader:
    def __init__(self, root, *, split="1", subset="train", modalities=("rgb",), batch_size, frames_per_clip=32,
                 frame_stride=1, crop_size=128, pair_mode="same", segments="quarters", num_segments=4, seed=0,
                 rank=0, world_size=1, device="cpu", device_id=None, num_threads=2, backend="dali",
                 dtype=torch.float32, augment="standard",
                 crop_scale_min=0.2):
        reader = ShardReader(root, split, subset)
        self.videos = reader.videos
        self.group_ids = reader.group_ids
        self.modalities, self.batch_size, self.seed = modalities, batch_size, seed
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        self.shape = (frames_per_clip, crop_size, crop_size)
        self.steps_per_epoch = len(self.videos) // (batch_size * world_size)

    def clip(self, video_index: int, modality: str) -> torch.Tensor:
        """The fixed content of one video: [C, T, H, W], smooth in space and changing over time."""
        g = torch.Generator().manual_seed(1000 * video_index + CHANNELS[modality])
        t, h, w = self.shape
        coarse = torch.randn(CHANNELS[modality], t, max(1, h // 4), max(1, w // 4), generator=g)
        return F.interpolate(coarse.unsqueeze(0), size=(t, h, w), mode="trilinear").squeeze(0)

    def batch_indices(self, epoch: int, step: int, rank: int | None = None) -> list[int]:
        order = torch.randperm(len(self.videos), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = (step * self.world_size + (self.rank if rank is None else rank)) * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def epoch(self, epoch: int, start_step: int = 0):
        for step in range(start_step, self.steps_per_epoch):
            indices = self.batch_indices(epoch, step)
            g = torch.Generator().manual_seed(hash((self.seed, epoch, step, self.rank)) % 2**31)
            batch = {}
            for modality in self.modalities:
                base = torch.stack([self.clip(i, modality) for i in indices])  # [B, C, T, H, W]
                copies = base.unsqueeze(1) + 0.3 * torch.randn((len(indices), 2, *base.shape[1:]), generator=g)
                batch[modality] = copies.to(self.dtype)
            records = [self.videos[i] for i in indices]
            batch["video_index"] = torch.tensor(indices)
            batch["group"] = torch.tensor([self.group_ids[r.group] for r in records])
            batch["label"] = torch.tensor([r.label for r in records])
            yield batch


class RowStats(torch.nn.Module):
    """A stand-in encoder: each row's first value next to the mean of its batch (its BN group)."""

    def forward(self, x):
        return torch.stack([x[:, 0], x[:, 0].mean().expand(len(x))], dim=1)


def shuffle_check(out_dir: str) -> int:
    """Under torchrun: shuffled_encode across ranks returns each rank's own rows; writes what it saw."""
    import json

    from cvtcl import distributed
    from cvtcl.moco import Permutation, shuffled_encode

    info = distributed.init("cpu")
    n = 4
    x = (info.rank * n + torch.arange(n, dtype=torch.float32)).view(n, 1)  # row value = global id
    perm = Permutation.draw(info.world_size * n, torch.Generator().manual_seed(0), torch.device("cpu"))
    z = shuffled_encode(RowStats(), x, perm)
    result = {"own": z[:, 0].tolist(), "group_mean": z[:, 1].tolist()}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()
    return 0


def call_graphs_check(out_dir: str) -> int:
    """Under torchrun: the step with run.graph_scope=calls (CPU stand-in captures) against the eager
    step, 6 steps of each from the same start; writes what this process saw."""
    import json

    from cvtcl import distributed
    from test_graphed import _run

    info = distributed.init("cpu")
    eager, eager_weights, _ = _run(["loss.queue_size=16"], 6, graph=False, dist=info)
    replayed, weights, ctx = _run(["loss.queue_size=16"], 6, graph=True, scope="calls", dist=info)
    result = {"error": ctx.graph.error, "captures": len(ctx.graph.captures), "losses": [v["loss"] for v in replayed],
              "losses_equal": replayed == eager, "weights_equal": all(torch.equal(a, b) for a, b in zip(weights, eager_weights)),
              "weights": [float(p.double().sum()) for p in ctx.model.query.parameters()]}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()
    return 0


def compiling_with(backend: str, announce: bool = False):
    """A replacement for `Encoder.compile`: torch.compile's tracing, but another backend than
    inductor, whose C++ compile takes minutes here ("eager": the traced ops as they are).
    `announce`: say so on stderr at each compile."""
    compile_module = torch.nn.Module.compile

    def compile_with_backend(self, **options):
        if announce:
            print(f"compiling an encoder, backend {backend}, {options}", file=sys.stderr)
        compile_module(self, **options, backend=backend)

    return compile_with_backend


def main() -> int:
    """`python tests/trainer_fakes.py --preset ...`: cvtcl.train with the fake loader (subprocess tests);
    `python tests/trainer_fakes.py shuffle-check DIR`: the cross-rank shuffle-BN check;
    `python tests/trainer_fakes.py call-graphs-check DIR`: per-call graphs under DDP."""
    if sys.argv[1] == "shuffle-check":
        return shuffle_check(sys.argv[2])
    if sys.argv[1] == "call-graphs-check":
        return call_graphs_check(sys.argv[2])
    if os.environ.get("CVTCL_FAKE_COMPILE_BACKEND"):
        from cvtcl.models import Encoder

        Encoder.compile = compiling_with(os.environ["CVTCL_FAKE_COMPILE_BACKEND"], announce=True)
    from cvtcl.train import main as train_main

    return train_main(sys.argv[1:], build_loader=FakePretrainLoader)


if __name__ == "__main__":
    sys.exit(main())


def graphs_on_cpu(monkeypatch) -> None:
    """run.compile=graph|step as on a GPU: graphs used on the CPU with the capture's stand-in
    (`run.graph_scope=auto` as in one process: the whole step), the GPU's draws (one key-encoder
    call with split BatchNorms) and its fused Adam (its skip of a non-finite step is a device op a
    capture can hold)."""
    from cvtcl import engine, graphed, train
    from cvtcl.capture import recorded_capture

    monkeypatch.setattr(engine, "split_key_batch_norm", lambda device: True)

    monkeypatch.setattr(graphed, "scope", lambda ctx: ctx.config.run.captures_step and
                        {"auto": "step"}.get(ctx.config.run.graph_scope, ctx.config.run.graph_scope) or None)
    monkeypatch.setattr(graphed, "cuda_capture", recorded_capture)
    adam = torch.optim.Adam
    monkeypatch.setattr(train.torch.optim, "Adam", lambda *a, **k: adam(*a, **{**k, "fused": True, "capturable": False}))


def torchrun_check(check: str, out_dir) -> subprocess.CompletedProcess:
    """`python tests/trainer_fakes.py CHECK OUT_DIR` under torchrun, two gloo processes."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "tests" / "trainer_fakes.py"), check, str(out_dir)]
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)


def two_nodes(program: list[str], env: dict, cwd) -> list[tuple[int, str]]:
    """`program` (a script or `-m module`, with its arguments) launched as two nodes of one process
    each on this machine, as README.md launches several nodes (torchrun's c10d rendezvous): the
    two processes get LOCAL_RANK 0 and RANK 0 and 1. -> (exit status, stdout + stderr) per node."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-id", "two-nodes", "--rdzv-endpoint", f"127.0.0.1:{port}", *program]
    agents = [subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        logs = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    return [(agent.returncode, out + err) for agent, (out, err) in zip(agents, logs)]


def smoke_args(dataset, out_dir, *extra) -> list[str]:
    """cvtcl.train arguments of a small smoke run on a fake dataset (the trainer tests' common base)."""
    return ["--preset", "smoke", f"data.root={dataset}", f"run.out_dir={out_dir}", "loss.queue_size=16",
            "run.progress=plain", "optim.epochs=10", *extra]


def bake_a_host_value_into_the_step(monkeypatch) -> None:
    """Make stage 1's loss depend on a host count that changes every step (ctx.step): a CUDA
    graph (or its CPU stand-in) replays the value of its capture, so replays leave the eager step."""
    from cvtcl import engine

    real = engine.STEPS["instance"]

    def step_with_a_host_value(ctx, batch, draws):
        out = real(ctx, batch, draws)
        out.loss = out.loss * (1 + ctx.step % 2)
        return out

    monkeypatch.setitem(engine.STEPS, "instance", step_with_a_host_value)
