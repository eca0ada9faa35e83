"""Flow workers batch pairs across videos (preprocess/flow_workers.py); the shards they help
write are byte-identical to the per-video path's."""

import numpy as np
import pytest

from preprocess.flow_workers import PairBatcher


def _video(frames: int, value: int, shape=(4, 5)) -> np.ndarray:
    return np.full((frames, *shape), value, np.uint8) + np.arange(frames, dtype=np.uint8)[:, None, None]


def test_batches_span_videos_and_results_come_back_per_video():
    batcher = PairBatcher(batch=4)
    batcher.add("a", _video(3, 10))  # 2 pairs
    batcher.add("b", _video(5, 50))  # 4 pairs
    batcher.add("c", _video(2, 90, shape=(6, 5)))  # another size: a batch of its own
    assert batcher.pending == 7
    frames, first, pieces = batcher.next_batch()
    # a's 2 pairs, then b's first 2: a's 3 frames and b's frames 0..2 back to back
    assert frames.shape == (6, 4, 5) and first.tolist() == [0, 1, 3, 4]
    assert frames[first + 1, 0, 0].tolist() == [11, 12, 51, 52]
    fake = frames[first].astype(np.float32)[..., None].repeat(2, axis=-1)  # "flow" = first frame
    assert [key for key, _ in batcher.put(pieces, fake)] == ["a"]
    frames, first, pieces = batcher.next_batch()
    assert frames.shape == (3, 4, 5) and first.tolist() == [0, 1]  # b's pairs 2 and 3, not c's
    done = dict(batcher.put(pieces, frames[first].astype(np.float32)[..., None].repeat(2, axis=-1)))
    assert list(done) == ["b"] and done["b"][:, 0, 0, 0].tolist() == [50, 51, 52, 53]
    frames, first, pieces = batcher.next_batch()
    assert frames.shape == (2, 6, 5) and first.tolist() == [0]
    assert [key for key, _ in batcher.put(pieces, np.zeros((1, 6, 5, 2), np.float32))] == ["c"]
    assert batcher.pending == 0 and not batcher.videos


@pytest.mark.multiprocess
def test_cross_video_batches_write_the_same_shards(tmp_path):
    """Two CPU flow workers, batches of 4 pairs over 5-frame videos (so every batch spans two
    videos) against the per-video path: the same shard bytes."""
    import dataclasses

    from preprocess.datasets import index_ucf101
    from preprocess.pack import PackOptions, pack
    from preprocess.synthetic import SyntheticConfig, generate_raw

    raw = generate_raw(SyntheticConfig(classes=2, videos_per_class=3, clips_per_group=1, frames=5,
                                       height=24, width=32), tmp_path / "raw")
    index = index_ucf101(raw, dataset="synthetic")
    base = PackOptions(out=str(tmp_path / "per_video"), workers=1, videos_per_shard=4, flow="tvl1-torch",
                       flow_options={"device": "cpu", "batch": 4})
    per_video = pack(index, base)
    crossed = pack(index, dataclasses.replace(base, out=str(tmp_path / "crossed"), workers=2,
                                              flow_devices=("cpu", "cpu")))
    assert per_video.params == crossed.params
    assert [s["sha256"] for s in per_video.shards] == [s["sha256"] for s in crossed.shards]
    assert len(per_video.videos) == 6 and not per_video.failed


class _Props:
    total_memory = 141 << 30  # an H200


@pytest.fixture()
def gpus(monkeypatch):
    """torch.cuda reports `gpus.count` devices of 141 GiB, on a 16-core machine."""
    import os
    import types

    import torch

    state = types.SimpleNamespace(count=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Props())
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    return state


def test_flow_device_cuda_spreads_workers_over_every_gpu(gpus):
    from preprocess.flow_workers import resolve_flow_devices

    assert resolve_flow_devices("tvl1-torch", "cuda", None, None, None) == (
        "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda:2")
    assert resolve_flow_devices("tvl1-torch", None, "0,2", 1, None) == ("cuda:0", "cuda:2")
    assert resolve_flow_devices("tvl1-torch", "cuda:1", None, None, 64) == ("cuda:1", "cuda:1")
    assert resolve_flow_devices("tvl1-torch", "cpu", None, None, None) == ()
    assert resolve_flow_devices("tvl1", None, None, None, None) == ()
    for args, match in [(("tvl1", "cuda", None, None, None), "needs --flow tvl1-torch"),
                        (("tvl1-torch", None, "0,3", None, None), "sees 3 GPU"),
                        (("tvl1-torch", None, "0,x", None, None), "GPU indices"),
                        (("tvl1-torch", "cuda0", None, None, None), "must be cpu, cuda or cuda:N; got 'cuda0'"),
                        (("tvl1-torch", "cuda:x", None, None, None), "must be cpu, cuda or cuda:N; got 'cuda:x'"),
                        (("tvl1-torch", "cpu", None, 2, None), "needs --flow-device cuda")]:
        with pytest.raises(ValueError, match=match):
            resolve_flow_devices(*args)


def test_workers_per_gpu_rule():
    from preprocess.flow_workers import workers_per_gpu

    assert workers_per_gpu(141 << 30, 64, 16, 8) == 1  # 8 GPUs on 16 cores: half the cores decode
    assert workers_per_gpu(141 << 30, 64, 16, 2) == 2
    assert workers_per_gpu(3 << 30, 64, 16, 1) == 1  # one working set fits at most: still one worker
    assert workers_per_gpu(141 << 30, 64, 1, 1) == 1


def test_gpu_requested_without_one_is_one_line_and_exit_2(gpus, tmp_path, capsys):
    from preprocess.cli import main

    gpus.count = 0
    status = main(["synthetic", "--out", str(tmp_path / "d"), "--flow", "tvl1-torch", "--flow-device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "no CUDA device" in err and "--flow-device cpu" in err
    assert not (tmp_path / "d").exists()  # nothing generated or packed


def test_worker_errors_are_one_line_and_say_what_to_lower():
    from preprocess.flow_workers import worker_error

    class OutOfMemoryError(RuntimeError):  # torch's class name; the worker sends text only
        pass

    assert worker_error("cuda:1", OutOfMemoryError("CUDA out of memory.\nTried to allocate"), {"batch": 96}) == (
        "flow worker on cuda:1 ran out of GPU memory (--flow-batch 96 frame pairs per call): lower --flow-batch "
        "or --flow-workers-per-gpu")
    assert "the default --flow-batch" in worker_error("cuda:0", OutOfMemoryError(), {})
    assert worker_error("cuda:0", RuntimeError("driver\nfault"), {}) == "flow worker on cuda:0: RuntimeError: driver fault"


@pytest.mark.multiprocess
def test_a_failing_flow_worker_stops_the_run_with_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """A flow worker that cannot work (here: a GPU this machine does not have, past the command's
    own check) stops the run: one line naming the worker, exit 1, no traceback."""
    from preprocess import cli

    monkeypatch.setattr(cli, "resolve_flow_devices", lambda *args: ("cuda:7",))
    status = cli.main(["synthetic", "--classes", "2", "--videos-per-class", "2", "--clips-per-group", "1",
                       "--frames", "5", "--height", "24", "--width", "32", "--flow", "tvl1-torch",
                       "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert status == 1, err
    assert len(lines) == 1 and lines[0].startswith("cvtcl-preprocess synthetic: error: flow worker on cuda:7: "), err
    # said as the workers start: the fast path's compile makes the first videos late, not stuck
    assert "flow: 1 tvl1-torch worker(s) on cuda:7; each compiles the fast path before its first batch" in err
    assert lines[0].endswith("the finished shards are kept: rerun the same command to resume")
    assert "Traceback" not in err


def test_the_flow_workers_line():
    from preprocess.flow_workers import describe_flow_workers

    line = describe_flow_workers("tvl1-torch", ("cuda:0", "cuda:1", "cuda:0", "cuda:1"), {"batch": 64})
    assert line.startswith("flow: 4 tvl1-torch worker(s) on cuda:0 x2, cuda:1 x2; each compiles the fast path")
    assert describe_flow_workers("tvl1-torch", ("cpu", "cpu"), {"device": "cpu"}) == "flow: 2 tvl1-torch worker(s) on cpu x2"
    assert "compiles" not in describe_flow_workers("tvl1-torch", ("cuda:0",), {"path": "eager"})


def test_each_flow_worker_compiles_with_its_share_of_the_cores(monkeypatch):
    """Every flow worker compiles the fast path at its start, all at once; inductor would give
    each min(32, cores) compile processes. Each gets its share of the cores instead, set before
    torch is imported in the worker; a value the user set stays."""
    import os
    import queue

    from preprocess import flow_workers

    seen = []

    def make_backend(flow, **options):
        seen.append(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(flow_workers, "make_backend", make_backend)
    monkeypatch.setattr(flow_workers, "die_with_parent_if_child", lambda: None)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    outbox = queue.Queue()
    flow_workers.flow_worker("cuda:0", "tvl1-torch", {}, 95, queue.Queue(), outbox, compiling=4)
    assert seen == ["4"] and outbox.get_nowait()[2] == "flow worker on cuda:0: RuntimeError: stop here"
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
    flow_workers.flow_worker("cuda:0", "tvl1-torch", {}, 95, queue.Queue(), outbox, compiling=4)
    assert seen == ["4", "8"]
