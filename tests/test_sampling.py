"""Sample plans are pure functions of (seed, epoch, rank, index) and obey docs/algorithm.md's rules."""

import math

import numpy as np
import pytest

from dali_pipelines.sampling import (
    SamplingConfig,
    colour_jitter,
    copy_augment,
    eval_crops,
    eval_windows,
    flow_indices,
    plan_sample,
    rank_order,
    random_resized_crop,
    spread_segments,
    steps_per_epoch,
    window,
)
from preprocess.schema import VideoRecord


def _videos(lengths, h=24, w=32):
    return [VideoRecord(f"v{i}", "c", 0, f"g{i}", n, 25.0, h, w) for i, n in enumerate(lengths)]


def test_quarters_needs_pair_mode_same():
    for mode in ("independent", "coclr"):
        with pytest.raises(ValueError, match="quarters.*pair_mode='same'"):
            SamplingConfig(pair_mode=mode, segments="quarters")
    SamplingConfig(pair_mode="coclr", segments="spread")
    with pytest.raises(ValueError, match="divisible"):
        SamplingConfig(frames_per_clip=10, num_segments=4)


def test_window_inside_video_and_front_padding():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        w = window(40, 8, 2, rng)
        assert w.min() >= 0 and w.max() <= 39 and np.all(np.diff(w) == 2)
        starts.add(int(w[0]))
    assert starts == set(range(0, 40 - 14))  # every legal start 0 .. n - 1 - (T - 1) * stride
    short = window(5, 8, 1, rng)
    assert short.tolist() == [0, 0, 0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [5, 31, 32, 100])
def test_spread_segments_non_overlapping_and_inside(n):
    cfg = SamplingConfig(frames_per_clip=16, num_segments=4, segments="spread")
    rng = np.random.default_rng(n)
    for _ in range(50):
        seg = spread_segments(n, cfg, rng)
        assert seg.shape == (4, 4)
        assert seg.min() >= 0 and seg.max() < n
        real = [row[row > 0] if n < 16 else row for row in seg]
        if n >= 16:  # long enough: segments strictly ordered, no shared frame
            assert all(real[j].max() < real[j + 1].min() for j in range(3))
        assert all(np.all(np.diff(row) >= 0) for row in seg)


def test_rank_parts_disjoint_equal_and_deterministic():
    parts = [rank_order(23, seed=3, epoch=5, rank=r, world_size=4) for r in range(4)]
    assert all(len(p) == 5 for p in parts)
    assert len(set(np.concatenate(parts).tolist())) == 20
    assert np.array_equal(parts[1], rank_order(23, 3, 5, 1, 4))
    assert not np.array_equal(rank_order(23, 3, 5, 0, 1), rank_order(23, 3, 6, 0, 1))
    assert steps_per_epoch(23, 2, 4) == 2


def test_plans_deterministic_and_different_per_clip():
    videos = _videos([40] * 6)
    cfg = SamplingConfig(frames_per_clip=8, num_segments=2)
    a = [plan_sample(videos, cfg, 2, 0, 1, i) for i in range(6)]
    b = [plan_sample(videos, cfg, 2, 0, 1, i) for i in range(6)]
    for x, y in zip(a, b):
        assert x.video_index == y.video_index and np.array_equal(x.frames, y.frames)
        assert x.augment[0].crop == y.augment[0].crop and np.array_equal(x.augment[1].colour, y.augment[1].colour)
    crops = {p.augment[v].crop for p in a for v in (0, 1)}
    assert len(crops) == 12  # every copy of every clip has its own crop
    assert all(np.array_equal(p.frames[0], p.frames[1]) for p in a)  # pair mode same


def test_pair_modes_independent_and_coclr():
    videos = _videos([200] * 40)
    ind = SamplingConfig(frames_per_clip=8, pair_mode="independent", segments="spread", num_segments=2)
    coclr = SamplingConfig(frames_per_clip=8, pair_mode="coclr", segments="spread", num_segments=2)
    same_ind = [np.array_equal(*plan_sample(videos, ind, 0, 0, 1, i).frames) for i in range(40)]
    same_coclr = [np.array_equal(*plan_sample(videos, coclr, 0, 0, 1, i).frames) for i in range(40)]
    assert sum(same_ind) <= 2
    assert 8 <= sum(same_coclr) <= 32


def test_random_resized_crop_bounds_and_fallback():
    rng = np.random.default_rng(1)
    for _ in range(200):
        y0, x0, h, w = random_resized_crop(24, 32, rng)
        assert 0 <= y0 and y0 + h <= 24 and 0 <= x0 and x0 + w <= 32
        assert 0.2 * 768 * 0.8 <= h * w <= 768
    # a frame too thin for any legal aspect ratio falls back to a centre crop
    assert random_resized_crop(100, 4, rng, tries=0) == (47, 0, 5, 4)


def test_random_resized_crop_may_span_the_whole_width():
    """A drawn crop exactly as wide as the frame is legal (torchvision: `w <= width`), so it is
    placed at a random height; rejecting it would send every draw to the centre-crop fallback."""
    rng = np.random.default_rng(2)
    crops = [random_resized_crop(20, 10, rng, scale=(0.5, 0.5), ratio=(1.0, 1.0)) for _ in range(50)]
    assert all((x0, h, w) == (0, 10, 10) for _, x0, h, w in crops)  # area 100 at aspect 1: 10 x 10
    assert len({y0 for y0, _, _, _ in crops}) > 5  # not always the centre (5, 0, 10, 10)


def test_crop_scale_min_bounds_every_copy():
    videos = _videos([40] * 30, h=48, w=64)
    for low in (0.2, 0.6):
        cfg = SamplingConfig(frames_per_clip=8, crop_scale_min=low)
        areas = [h * w / (48 * 64) for i in range(30) for _, _, h, w in
                 (a.crop for a in plan_sample(videos, cfg, 0, 0, 1, i).augment)]
        assert min(areas) >= low * 0.9  # rounding of h and w
        if low == 0.2:
            assert min(areas) < 0.5  # the default does draw small crops: the bound above can fail
    with pytest.raises(ValueError, match="crop_scale_min"):
        SamplingConfig(crop_scale_min=0.0)


def test_flow_indices_clamp_last_frame():
    assert flow_indices(np.array([7, 8, 9]), 10).tolist() == [7, 8, 8]
    with pytest.raises(ValueError, match="video v_a has 1 frame.s., so no flow"):
        flow_indices(np.array([0]), 1, "v_a")


def test_eval_windows_and_crops():
    windows = eval_windows(_videos([40, 5]), 8, 16)
    assert [(v, int(f[0])) for v, f in windows] == [(0, 0), (0, 16), (0, 32), (1, 0)]
    assert windows[-1][1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert eval_crops(240, 320, ten=False) == [(8, 48, 224, 224)]
    ten = eval_crops(240, 320, ten=True)
    assert ten[0] == (0, 0, 224, 224) and ten[3] == (16, 96, 224, 224) and ten[4] == (8, 48, 224, 224)


@pytest.mark.parametrize("frames,stride", [(8, 4), (8, 8), (32, 16), (5, 3)])
def test_eval_windows_are_every_start_that_fits_and_stay_small(frames, stride):
    """Written out: starts 0, stride, ... up to n - T (one front-padded window below T frames). At
    Kinetics size the list of index arrays was 1.6 GB, copied into each spawned loader worker."""
    import pickle

    lengths = [1, 2, frames - 1, frames, frames + 1, 3 * frames + 2, 57]
    expected = []
    for v, n in enumerate(lengths):
        if n < frames:
            expected.append((v, [0] * (frames - n) + list(range(n))))
        start = 0
        while start + frames <= n:
            expected.append((v, list(range(start, start + frames))))
            start += stride
    windows = eval_windows(_videos(lengths), frames, stride)
    assert [(v, f.tolist()) for v, f in windows] == expected and len(windows) == len(expected)
    assert [(v, f.tolist()) for v, f in windows[2:5]] == expected[2:5]
    many = eval_windows(_videos([300] * 2000), 32, 16)  # 34,000 windows
    assert len(many) == 2000 * 17 and len(pickle.dumps(many)) < 10 * len(many)  # bytes per window


def _no_colour(aug):
    return np.array_equal(aug.colour, np.hstack([np.eye(3), np.zeros((3, 1))]))


def _is_weak(aug):
    return _no_colour(aug) and aug.blur_sigma == 0.0


def _same_draw(x, y):
    return np.array_equal(x.colour, y.colour) and x.blur_sigma == y.blur_sigma


def _plans(augment, pair_mode="same", n=400):
    cfg = SamplingConfig(frames_per_clip=8, num_segments=2, augment=augment, pair_mode=pair_mode,
                         segments="quarters" if pair_mode == "same" else "spread")
    videos = _videos([40] * n)
    return [plan_sample(videos, cfg, 0, 0, 1, i) for i in range(n)]


def test_augment_strength_changes_colour_and_blur_only():
    with pytest.raises(ValueError, match="augment='strong'"):
        SamplingConfig(augment="strong")
    standard, weak, coclr = _plans("standard"), _plans("weak"), _plans("coclr")
    for a, b, c in zip(standard, weak, coclr):  # frames, crops and flips never depend on the strength
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.frames, c.frames)
        assert [x.crop for x in a.augment] == [x.crop for x in b.augment] == [x.crop for x in c.augment]
        assert [x.flip for x in a.augment] == [x.flip for x in b.augment] == [x.flip for x in c.augment]
    copies = [aug for plan in standard for aug in plan.augment]
    gray = [a for a in copies if np.allclose(a.colour[:, :3], a.colour[0, :3])]  # every row = luma weights
    assert abs(np.mean([a.blur_sigma > 0 for a in copies]) - 0.5) < 0.06  # blur p = 0.5
    assert abs(np.mean([not _no_colour(a) for a in copies]) - (1 - 0.2 * 0.8)) < 0.05  # no jitter (0.2) and no gray (0.8)
    assert abs(len(gray) / len(copies) - 0.2) < 0.05  # grayscale p = 0.2
    assert all(_is_weak(a) for plan in weak for a in plan.augment)  # weak: crop + flip only


def test_coclr_controller_one_strong_copy_per_window_else_p03():
    standard, coclr = _plans("standard"), _plans("coclr")
    firsts = []
    for s, c in zip(standard, coclr):
        strong = [_same_draw(x, y) for x, y in zip(s.augment, c.augment)]
        weak = [_is_weak(x) for x in c.augment]
        assert all(st or wk for st, wk in zip(strong, weak))  # each copy is the strong draw or stripped
        if not any(_is_weak(x) for x in s.augment):  # both standard copies visibly strong
            assert sum(strong) == 1  # one strong and one weak view of the same frames
            firsts.append(strong[0])
    assert len(firsts) > 200 and abs(np.mean(firsts) - 0.5) < 0.1
    two_windows = _plans("coclr", pair_mode="independent")
    reference = _plans("standard", pair_mode="independent")
    strong = [_same_draw(x, y) for s, c in zip(reference, two_windows) for x, y in zip(s.augment, c.augment)
              if not _is_weak(x)]  # copies whose strong draw is visible
    assert abs(np.mean(strong) - 0.3) < 0.06  # each copy of a two-window pair is strong with p = 0.3
    again = _plans("coclr")  # deterministic in (seed, epoch, rank, index)
    assert all(_same_draw(x, y) for a, b in zip(coclr, again) for x, y in zip(a.augment, b.augment))


def test_flip_rate_is_one_half():
    """Each copy is flipped with p = 0.5 (docs/algorithm.md); both backends read the flag, so a rate of
    0 or 1 would pass every equality test above while dropping the augmentation."""
    copies = [aug for plan in _plans("standard") for aug in plan.augment]
    assert abs(np.mean([a.flip for a in copies]) - 0.5) < 0.06


def test_hue_jitter_rotates_up_to_a_tenth_of_the_circle():
    """Hue 0.1 is torchvision's fraction of the colour circle: rotations of up to 0.1 * 2 pi. The map
    is similar to a rotation of YIQ's chroma plane, so its trace is 1 + 2 cos(angle)."""
    rng = np.random.default_rng(0)
    angles = []
    for _ in range(200):
        matrix = colour_jitter(rng, strength=(0.0, 0.0, 0.0, 0.1), p_jitter=1.0, p_gray=0.0)
        assert np.allclose(matrix[:, 3], 0.0)
        angles.append(math.acos(np.clip((np.trace(matrix[:, :3]) - 1) / 2, -1, 1)))
    assert max(angles) <= 0.2 * math.pi + 1e-9
    assert max(angles) > 0.9 * 0.2 * math.pi  # the draws do reach the edge of the range


def test_contrast_pivots_around_mid_grey():
    """Contrast c scales the distance from mid-grey: 128 stays 128 and the factor covers [0.6, 1.4];
    with saturation and hue (grey has no chroma) and grayscale, grey still stays grey."""
    rng = np.random.default_rng(0)
    grey = np.array([128.0, 128.0, 128.0, 1.0])
    factors = []
    for _ in range(200):
        matrix = colour_jitter(rng, strength=(0.0, 0.4, 0.0, 0.0), p_jitter=1.0, p_gray=0.0)
        assert np.allclose(matrix @ grey, 128.0)
        assert np.allclose(matrix[:, :3], matrix[0, 0] * np.eye(3))
        factors.append(matrix[0, 0])
    assert 0.6 <= min(factors) < 0.65 and 1.35 < max(factors) <= 1.4
    for _ in range(50):
        assert np.allclose(colour_jitter(rng, strength=(0.0, 0.4, 0.4, 0.1)) @ grey, 128.0)


def test_blur_sigma_is_drawn_from_0_1_to_2():
    """Blur p = 0.5 with sigma uniform in [0.1, 2.0] (docs/algorithm.md "Data per training sample")."""
    rng = np.random.default_rng(0)
    sigmas = [copy_augment(24, 32, True, rng).blur_sigma for _ in range(300)]
    blurred = [s for s in sigmas if s > 0]
    assert 0.1 <= min(blurred) < 0.3 and 1.8 < max(blurred) <= 2.0
