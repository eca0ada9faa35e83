"""tvl1-torch reproduces OpenCV's CPU DualTVL1 step by step and end to end (issue 7)."""

import cv2
import numpy as np
import pytest
import torch

from preprocess.flow import OpenCVTVL1, make_backend
from preprocess.flow_check import end_point_error, quantised_agreement, synthetic_video
from preprocess.flow_torch import (
    TorchTVL1,
    centred_gradient,
    median_blur,
    pyramid_sizes,
    resize_linear,
    warp_bicubic,
)

SIZES = [(48, 64), (64, 80)]
SEEDS = [0, 1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """tvl1-torch sets one CPU thread per process (its default, as in a preprocessing worker);
    give the rest of the session its setting back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flows():
    """Per (size, seed): generated frames, ground truth, OpenCV's flow and tvl1-torch's flow."""
    reference, torch_tvl1 = OpenCVTVL1(threads=1), TorchTVL1(device="cpu", batch=3)
    out = {}
    for size in SIZES:
        for seed in SEEDS:
            gray, truth = synthetic_video(5, *size, seed=seed)
            out[size, seed] = (gray, truth, reference.compute(gray), torch_tvl1.compute(gray))
    return out


def _smooth_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.float32), (0, 0), 1.5)


def test_resize_matches_opencv_both_ways():
    img = _smooth_image(48, 64)
    sizes = pyramid_sizes(48, 64, 5, 0.8)
    down = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    assert sizes[1] == down.shape
    ours = resize_linear(torch.from_numpy(img)[None], sizes[1], (1 / 0.8, 1 / 0.8))[0].numpy()
    np.testing.assert_allclose(ours, down, atol=1e-3)
    up = cv2.resize(down, (64, 48), interpolation=cv2.INTER_LINEAR)
    step = (down.shape[0] / 48, down.shape[1] / 64)
    ours = resize_linear(torch.from_numpy(down)[None], (48, 64), step)[0].numpy()
    np.testing.assert_allclose(ours, up, atol=1e-3)


def test_pyramid_stops_before_16_pixels():
    assert pyramid_sizes(240, 320, 5, 0.8) == [(240, 320), (192, 256), (154, 205), (123, 164), (98, 131)]
    assert pyramid_sizes(30, 200, 5, 0.8) == [(30, 200), (24, 160), (19, 128)]


def test_bicubic_warp_matches_remap_with_zero_border():
    img = _smooth_image(40, 56)
    rng = np.random.default_rng(1)
    u1 = (rng.standard_normal(img.shape) * 6).astype(np.float32)  # many samples fall outside
    u2 = (rng.standard_normal(img.shape) * 6).astype(np.float32)
    y, x = np.mgrid[0:40, 0:56].astype(np.float32)
    expected = cv2.remap(img, x + u1, y + u2, cv2.INTER_CUBIC)
    t = torch.from_numpy
    ours = warp_bicubic(t(img)[None, None], t(u1)[None], t(u2)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3)


@pytest.mark.parametrize("ksize", [3, 5])
def test_median_matches_opencv(ksize):
    u = np.random.default_rng(2).standard_normal((2, 23, 31)).astype(np.float32)
    expected = np.stack([cv2.medianBlur(plane, ksize) for plane in u])
    np.testing.assert_array_equal(median_blur(torch.from_numpy(u), ksize).numpy(), expected)


def test_centred_gradient_border_rule():
    img = torch.tensor([[0.0, 1.0, 4.0, 9.0], [1.0, 2.0, 5.0, 10.0], [3.0, 4.0, 7.0, 12.0]])[None]
    dx, dy = centred_gradient(img)
    # Interior: centred difference; border: half the one-sided difference (OpenCV's rule).
    assert dx[0, 1, 1] == 0.5 * (5.0 - 1.0) and dx[0, 1, 0] == 0.5 * (2.0 - 1.0)
    assert dx[0, 0, 3] == 0.5 * (9.0 - 4.0)
    assert dy[0, 0, 2] == 0.5 * (5.0 - 4.0) and dy[0, 2, 2] == 0.5 * (7.0 - 5.0)


@pytest.mark.parametrize("size", SIZES)
def test_agrees_with_opencv(flows, size):
    for seed in SEEDS:
        _, _, reference, ours = flows[size, seed]
        assert ours.shape == reference.shape and ours.dtype == np.float32
        assert end_point_error(ours, reference) <= 0.05
        levels = quantised_agreement(ours, reference)
        assert levels["mean_level_delta"] <= 0.3
        assert levels["frac_over_one_level"] <= 0.03


def test_as_accurate_as_opencv_on_ground_truth(flows):
    for (gray, truth, reference, ours) in flows.values():
        assert end_point_error(ours, truth) <= 1.1 * end_point_error(reference, truth)
        assert end_point_error(ours, truth) < 0.5  # the generated motion is recovered at all


def test_backend_through_registry_is_batch_invariant(flows):
    gray, _, _, batched = flows[SIZES[0], SEEDS[0]]
    backend = make_backend("tvl1-torch", device="cpu", batch=1)
    assert backend.name == "tvl1-torch"
    # Pairs are solved independently: chunking the video changes nothing.
    np.testing.assert_array_equal(backend.compute(gray), batched)
    assert backend.compute(gray[:1]).shape == (0, *gray.shape[1:], 2)


def test_pairs_of_several_videos_in_one_batch_match_per_video(flows):
    """compute_pairs: frames of several videos back to back, only pairs inside a video; each
    pair's flow is bitwise the per-video one (pairs are solved independently)."""
    (a, _, _, flow_a), (b, _, _, flow_b) = flows[SIZES[0], 0], flows[SIZES[0], 1]
    frames = np.concatenate((a, b))
    first = np.array([1, 3, len(a), len(a) + 2])  # a's pairs 1 and 3, b's pairs 0 and 2
    out = TorchTVL1(device="cpu").compute_pairs(frames, first)
    np.testing.assert_array_equal(out, np.concatenate((flow_a[[1, 3]], flow_b[[0, 2]])))


def test_params_name_the_opencv_settings():
    ours, reference = TorchTVL1().params(), OpenCVTVL1().params()
    shared = set(reference) - {"opencv"}
    assert shared <= set(ours)
    assert {k: ours[k] for k in shared} == pytest.approx({k: reference[k] for k in shared})
    assert TorchTVL1(warps=3).params()["warps"] == 3


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="unknown TV-L1 parameter"):
        TorchTVL1(lamda=0.1)
    with pytest.raises(ValueError, match="gamma"):
        TorchTVL1(gamma=0.5)
    with pytest.raises(ValueError, match="cpu or cuda"):
        TorchTVL1(device="mps")
    with pytest.raises(ValueError, match="path must be one of"):
        TorchTVL1(path="triton")


def test_fast_path_is_the_default_on_cuda_only():
    assert TorchTVL1(device="cuda").path == "compiled" and TorchTVL1(device="cpu").path == "eager"


def test_constructor_leaves_cuda_alone():
    """Preprocessing builds a backend in the parent and then forks workers."""
    backend = make_backend("tvl1-torch", device="cuda", batch=8)
    backend.params()
    assert not torch.cuda.is_initialized()


def test_preprocessing_with_tvl1_torch_writes_verified_shards(tmp_path):
    """`cvtcl-preprocess ... --flow tvl1-torch --flow-device cpu --flow-batch N` end to end."""
    from preprocess.cli import main
    from preprocess.schema import dequantise_flow, load_manifest
    from preprocess.shards import ShardReader

    out = tmp_path / "data"
    status = main(["synthetic", "--out", str(out), "--classes", "2", "--videos-per-class", "2",
                   "--clips-per-group", "1", "--frames", "6", "--height", "32", "--width", "40",
                   "--workers", "1", "--videos-per-shard", "2",
                   "--flow", "tvl1-torch", "--flow-device", "cpu", "--flow-batch", "3"])
    assert status == 0
    assert main(["verify", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest.params["flow"] == {"backend": "tvl1-torch", "params": TorchTVL1().params()}
    reader = ShardReader(out)
    video = reader.videos[0]
    planes = reader.read_flow(video, 0, video.num_frames - 1)
    assert len(planes) == video.num_frames - 1
    x = dequantise_flow(cv2.imdecode(planes[0][0], cv2.IMREAD_GRAYSCALE))
    assert x.shape == (32, 40) and np.abs(x).max() > 0.2  # the synthetic videos move


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gray, _ = synthetic_video(6, 64, 80, seed=3)
    cpu = TorchTVL1(device="cpu").compute(gray)
    cuda = TorchTVL1(device="cuda", batch=2).compute(gray)
    assert end_point_error(cuda, cpu) <= 0.05


@pytest.mark.slow
def test_compiled_kernels_match_eager(flows):
    """The fast path compiled by inductor (a minute or more to compile on a 2-core CPU). Measured
    bitwise equal to eager on CPU; allowed 1e-3 px because the compiler may contract a multiply
    and an add into an FMA, and one ulp can move a pair's stop by an iteration."""
    gray, _, reference, eager = flows[SIZES[1], SEEDS[0]]
    compiled = TorchTVL1(device="cpu", batch=3, path="compiled").compute(gray)
    assert end_point_error(compiled, eager) <= 1e-3
    assert end_point_error(compiled, reference) <= 0.05
