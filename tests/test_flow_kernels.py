"""The fast path's control flow (chunks, buckets, float64 stopping norm) against the eager
reference. Inductor itself is replaced by the identity here (compiling takes minutes on a small
CPU; tests/test_flow_torch.py's slow test and benchmarks/gpu_check.sh run it compiled)."""

import dataclasses

import numpy as np
import pytest
import torch

from preprocess import flow_kernels, flow_torch
from preprocess.flow_check import end_point_error, quantised_agreement, synthetic_video
from preprocess.flow_torch import TorchTVL1, resize_linear
from preprocess.flow_torch_ops import _device_taps


@pytest.fixture()
def uncompiled(monkeypatch):
    monkeypatch.setattr(flow_kernels, "_compile", lambda fn: fn)
    flow_kernels.kernels.cache_clear()
    yield
    flow_kernels.kernels.cache_clear()


@pytest.fixture(scope="module")
def video_with_cut():
    """Two generated shots back to back: the pair across the cut never converges."""
    a, _ = synthetic_video(4, 40, 48, seed=0)
    b, _ = synthetic_video(4, 40, 48, seed=1)
    return np.concatenate((a, b))


def test_buckets_are_powers_of_two_up_to_the_batch():
    run = flow_kernels.Kernels("compiled", None, None, None, bucketed=True)
    assert [run.bucket(n, 12) for n in (12, 9, 8, 5, 4, 3, 2, 1)] == [12, 12, 8, 8, 4, 4, 2, 2]
    assert flow_kernels.Kernels("eager", None, None, None, bucketed=False).bucket(5, 12) == 5


def test_fast_path_control_flow_matches_eager_bitwise(uncompiled, video_with_cut, monkeypatch):
    """Chunks of sync_every iterations, buckets padded with frozen copies, the float64 norm:
    the same stops as eager here, so the same bits."""
    sizes = []
    original = flow_kernels.Kernels.bucket
    monkeypatch.setattr(flow_kernels.Kernels, "bucket",
                        lambda self, count, size: sizes.append(original(self, count, size)) or sizes[-1])
    eager = TorchTVL1(device="cpu", batch=7).compute(video_with_cut)
    fast = TorchTVL1(device="cpu", batch=7, path="compiled", sync_every=6).compute(video_with_cut)
    assert {4, 2} & set(sizes), "no bucket smaller than the batch: the cut did not hold a warp"
    np.testing.assert_array_equal(fast, eager)
    # a lone pair is solved next to a copy of itself (no batch of one to compile)
    np.testing.assert_array_equal(TorchTVL1(device="cpu", path="compiled").compute(video_with_cut[2:4]), eager[2:3])


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_no_chunk_runs_once_every_pair_has_converged(uncompiled, path, monkeypatch):
    """A warp ends at the first read that finds no pair running; iterating frozen pairs gives
    the same bits but costs the rest of the warp's outer iterations (was 8x the work)."""
    entered = []
    run = flow_kernels.kernels(path)

    def iterate(n):
        chunk = run.iterate(n)
        return lambda *args: entered.append(bool(args[10].any())) or chunk(*args)

    monkeypatch.setattr(flow_torch, "kernels", lambda _: dataclasses.replace(run, iterate=iterate))
    gray, _ = synthetic_video(3, 40, 48, seed=0)
    TorchTVL1(device="cpu", batch=2, path=path).compute(gray)
    assert entered and all(entered), f"{entered.count(False)} of {len(entered)} chunks had no live pair"


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_work_counts_the_rows_each_chunk_ran(uncompiled, path):
    """Work.pixel_iterations, which flow_speed turns into memory traffic, is the pixels of the
    working rows times the iterations each chunk ran. epsilon 0: a still pair (its update is
    exactly zero) stops in its first chunk, a moving pair never. Per warp (3 outer x 4 inner,
    chunks of 2): eager drops the still pair at the first read (2 rows x 2, then 1 row x 10);
    the fast path keeps it frozen in its smallest bucket, 2 rows (2 x 12)."""
    params = dict(warps=2, outer_iterations=3, inner_iterations=4, epsilon=0.0)
    still, _ = synthetic_video(2, 24, 32, seed=2)
    moving, _ = synthetic_video(2, 24, 32, seed=3)
    gray = np.concatenate((still[:1], still[:1], moving))
    backend = TorchTVL1(device="cpu", batch=2, path=path, sync_every=2, **params)
    backend.compute_pairs(gray, np.array([0, 2]))
    pixels = sum(h * w for h, w in flow_torch.pyramid_sizes(24, 32, 5, 0.8))
    per_warp = 2 * 2 + 1 * 10 if path == "eager" else 2 * 12
    assert backend.work == flow_torch.Work(pixel_iterations=pixels * 2 * per_warp, pairs=2)
    # alone, the still pair costs a chunk per warp (the fast path: next to a copy of itself)
    alone = TorchTVL1(device="cpu", batch=2, path=path, sync_every=2, **params)
    alone.compute(gray[:2])
    assert alone.work == flow_torch.Work(pixel_iterations=pixels * 2 * 2 * (1 if path == "eager" else 2), pairs=1)


def test_fast_path_within_opencv_limits(uncompiled, video_with_cut):
    from preprocess.flow import OpenCVTVL1

    gray = video_with_cut[:4]  # one shot: the agreement limits are for pairs with a true flow
    reference = OpenCVTVL1(threads=1).compute(gray)
    fast = TorchTVL1(device="cpu", batch=4, path="compiled").compute(gray)
    assert end_point_error(fast, reference) <= 0.05
    levels = quantised_agreement(fast, reference)
    assert levels["mean_level_delta"] <= 0.3 and levels["frac_over_one_level"] <= 0.03


def test_resize_uploads_its_taps_once():
    x = torch.rand(2, 20, 30)
    resize_linear(x, (16, 24), (1.25, 1.25))
    before = _device_taps.cache_info()
    resize_linear(x, (16, 24), (1.25, 1.25))
    after = _device_taps.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses


SHORT = {"nscales": 3, "warps": 2, "outer_iterations": 4}  # a replayed op costs Python here: fewer iterations


def _graphed(batch: int, capture) -> TorchTVL1:
    """The fast path with its chunks as graphs, captured by `capture` (CUDA's stand-in on the CPU)."""
    backend = TorchTVL1(device="cpu", batch=batch, path="compiled", sync_every=6, **SHORT)
    backend.graphs = flow_kernels.ChunkGraphs(capture)
    return backend


def test_chunks_replayed_as_graphs_give_the_same_bits(uncompiled, video_with_cut, monkeypatch):
    """Chunks captured once per working shape and replayed in place (host values frozen, as in a
    CUDA graph; cvtcl.capture.recorded_capture) solve every pair as the chunks run directly: the
    static state handed from replay to replay, compacted batches and new warps copied in."""
    from cvtcl.capture import recorded_capture

    direct = TorchTVL1(device="cpu", batch=7, path="compiled", sync_every=6, **SHORT).compute(video_with_cut)
    backend = _graphed(7, recorded_capture)
    graphs = backend.graphs
    np.testing.assert_array_equal(backend.compute(video_with_cut), direct)
    assert not graphs.graphs  # the first batch of a shape only warms up
    np.testing.assert_array_equal(backend.compute(video_with_cut), direct)  # a later batch captures and replays
    assert graphs.error is None and len(graphs.graphs) >= 4  # several levels and buckets
    assert {key[1][0] for key in graphs.graphs} >= {7, 2}  # the full batch and the cut pair's bucket
    count = len(graphs.graphs)
    np.testing.assert_array_equal(backend.compute(video_with_cut), direct)  # the same graphs again
    assert len(graphs.graphs) == count
    # at most MAX_GRAPHS are kept, the least recently used dropped
    monkeypatch.setattr(flow_kernels.ChunkGraphs, "MAX_GRAPHS", 2)
    small = _graphed(7, recorded_capture)
    for _ in range(3):
        np.testing.assert_array_equal(small.compute(video_with_cut), direct)
    assert len(small.graphs.graphs) == 2


def test_a_failed_capture_leaves_the_chunks_running_directly(uncompiled, video_with_cut):
    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    direct = TorchTVL1(device="cpu", batch=7, path="compiled", sync_every=6, **SHORT).compute(video_with_cut)
    backend = _graphed(7, failing)
    np.testing.assert_array_equal(backend.compute(video_with_cut), direct)
    with pytest.warns(RuntimeWarning, match=r"tvl1-torch: capturing CUDA graphs failed \(RuntimeError: operation "
                      r"not permitted when stream is capturing\); this process computes flow without them"):
        np.testing.assert_array_equal(backend.compute(video_with_cut), direct)  # the batch that tries to capture
    assert backend.graphs.error == "RuntimeError: operation not permitted when stream is capturing"
    assert not backend.graphs.graphs


def test_graphs_need_cuda_and_the_fast_path():
    assert TorchTVL1(device="cuda").graphs is not None  # the default on a GPU (nothing touches it yet)
    assert TorchTVL1(device="cuda", path="eager").graphs is None and TorchTVL1(device="cpu").graphs is None
    for device, path in (("cpu", "compiled"), ("cuda", "eager")):
        with pytest.raises(ValueError, match="CUDA graphs on a CUDA device with path=compiled only"):
            TorchTVL1(device=device, path=path, graphs=True)


def test_a_gpu_too_old_for_triton_solves_eagerly(monkeypatch):
    """Pascal (the paper's TITAN Xp): the default turns to eager without graphs; asking for the
    fast path there is refused with the reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    backend = TorchTVL1(device="cuda")
    backend._setup()
    assert backend.path == "eager" and backend.graphs is None
    with pytest.raises(ValueError, match="compute capability 7.0 or newer .*this one is 6.1"):
        TorchTVL1(device="cuda", path="compiled")._setup()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    backend = TorchTVL1(device="cuda")
    backend._setup()
    assert backend.path == "compiled" and backend.graphs is not None


def test_a_chunk_the_median_and_the_warp_never_wait_for_the_gpu(uncompiled):
    """On the meta device (every op dispatched as on a GPU, nothing computed): the fast path's
    chunk of iterations, masked median and bicubic warp make no host read and no blocking copy,
    so the host only waits at the reads between chunks, and a chunk can be a CUDA graph."""
    from cvtcl import step_audit

    run = flow_kernels.kernels("compiled")
    meta = torch.device("meta")
    field = lambda: torch.empty(4, 24, 32, device=meta)  # noqa: E731
    active = torch.empty(4, 1, 1, dtype=torch.bool, device=meta)
    threshold = run.threshold(0.01, meta)
    _, chunk = step_audit.audit(lambda: run.iterate(10)(*[field() for _ in range(10)], active, threshold, 0.045, 0.3, 0.83))
    _, median = step_audit.audit(lambda: run.median(field(), field(), active, 5))
    _, warp = step_audit.audit(lambda: run.warp(torch.empty(4, 3, 24, 32, device=meta), field(), field()))
    assert chunk.launch_count > 100 and median.launch_count > 50 and warp.launch_count > 10  # it did run
    assert (chunk.syncs, median.syncs, warp.syncs) == ({}, {}, {})


def test_chunks_get_the_layout_their_captures_copy_them_into(uncompiled, video_with_cut, monkeypatch):
    """A capture runs a chunk on static copies (clones) of its inputs; the compiled chunk guards on
    strides, so an input whose clone is laid out otherwise (a view of the warp's stacked output)
    would be compiled again inside the capture, where a GPU compile cannot run. Every tensor a
    chunk gets, in every batch, is laid out as its clone."""
    calls = []
    call = flow_kernels._call

    def recording(iterate, state, data, consts):
        calls.append([t.stride() == t.clone().stride() for t in [*state, *data] if isinstance(t, torch.Tensor)])
        return call(iterate, state, data, consts)

    monkeypatch.setattr(flow_kernels, "_call", recording)
    TorchTVL1(device="cpu", batch=7, path="compiled", sync_every=6, **SHORT).compute(video_with_cut)
    assert calls and all(all(same) for same in calls), sum(not all(same) for same in calls)
