"""The DALI pretraining loader (CPU-only mode): clip-consistent augmentation, flow flips,
determinism, resume, rank shards, agreement with the baseline loader, and corrupt data."""

import dataclasses
import time

import pytest
import torch

import dali_pipelines.pretrain as pretrain
from cvtcl.data import build_pretrain_loader
from dali_pipelines.source import CorruptFrameError, PretrainSource
from dali_pipelines.toy_shards import write_toy_dataset

KW = dict(batch_size=2, frames_per_clip=8, crop_size=16, num_segments=2, num_workers=0, num_threads=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_videos=8, num_frames=24, num_static=2, num_short=1)


def _batches(root, epoch=0, start_step=0, **kw):
    args = {**KW, **kw}
    return list(build_pretrain_loader(root, **args).epoch(epoch, start_step))


def test_contract_shapes_and_dtype(root):
    batch = _batches(root, modalities=("rgb", "flow"), segments="spread", pair_mode="coclr",
                     dtype=torch.float16)[0]
    assert batch["rgb"].shape == (2, 2, 3, 8, 16, 16) and batch["rgb"].dtype == torch.float16
    assert batch["flow"].shape == (2, 2, 2, 8, 16, 16)
    assert batch["rgb_segments"].shape == (2, 2, 2, 3, 4, 16, 16)
    assert batch["flow_segments"].shape == (2, 2, 2, 2, 4, 16, 16)
    assert batch["video_index"].dtype == torch.long and batch["group"].shape == (2,)


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_rank_and_batch_are_checked_when_the_loader_is_built(root, backend):
    with pytest.raises(ValueError, match=r"rank=2 outside 0\.\.1"):
        build_pretrain_loader(root, **{**KW, "backend": backend, "rank": 2, "world_size": 2})
    with pytest.raises(ValueError, match="8 videos give no full batch of 2 per process with 8 process"):
        build_pretrain_loader(root, **{**KW, "backend": backend, "world_size": 8})


def test_static_video_stays_static_and_clips_differ(root):
    seen_static = 0
    for batch in _batches(root, epoch=0) + _batches(root, epoch=1):
        rgb = batch["rgb"]  # [B, V, C, T, H, W]
        for i, vi in enumerate(batch["video_index"].tolist()):
            if vi < 2:  # the static videos: every frame of a copy must be identical after augmentation
                seen_static += 1
                assert (rgb[i] - rgb[i, :, :, :1]).abs().max() < 1e-5
                assert (rgb[i, 0] - rgb[i, 1]).abs().max() > 1e-2  # two copies, two augmentations
        assert (rgb[0] - rgb[1]).abs().max() > 1e-2
    assert seen_static >= 2


class FlipPairSource(PretrainSource):
    """Copy 1 = copy 0 with the flip toggled, so the two outputs differ only by the flip."""

    def plans(self, iteration):
        plans = super().plans(iteration)
        return [dataclasses.replace(p, augment=(p.augment[0], dataclasses.replace(p.augment[0], flip=not p.augment[0].flip)))
                for p in plans]


def test_flow_x_negated_exactly_on_flip_and_no_colour_on_flow(root, monkeypatch):
    monkeypatch.setattr(pretrain, "PretrainSource", FlipPairSource)
    batches = _batches(root, modalities=("rgb", "flow"))
    for batch in batches:
        flow, rgb = batch["flow"], batch["rgb"]
        mirrored = flow[:, 0].flip(-1)
        assert torch.equal(flow[:, 1, 0], -mirrored[:, 0])  # flow-x: negated, exactly
        assert torch.equal(flow[:, 1, 1], mirrored[:, 1])  # flow-y: only mirrored
        assert (rgb[:, 1] - rgb[:, 0].flip(-1)).abs().max() < 1e-4  # rgb: mirrored, same colours
        # flow values stay on the (u8 - 128) / 128 grid: no colour map or blur touched them
        assert torch.equal(flow * 128, (flow * 128).round())
    monkeypatch.undo()
    colourless = _batches(root, modalities=("rgb", "flow"), colour=False)
    plain = _batches(root, modalities=("rgb", "flow"))
    assert all(torch.equal(a["flow"], b["flow"]) for a, b in zip(plain, colourless, strict=True))


def test_determinism_resume_and_epochs(root):
    full = _batches(root, epoch=3, segments="spread", pair_mode="independent")
    again = _batches(root, epoch=3, segments="spread", pair_mode="independent")
    tail = _batches(root, epoch=3, start_step=2, segments="spread", pair_mode="independent")
    assert len(full) == 4 and len(tail) == 2
    for a, b in zip(full, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(full[2:], tail, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = _batches(root, epoch=4, segments="spread", pair_mode="independent")
    assert not torch.equal(full[0]["rgb"], other[0]["rgb"])


def test_one_pipeline_runs_across_epochs(root):
    loader = build_pretrain_loader(root, **KW)
    first = list(loader.epoch(0))
    stream = loader._stream
    second = list(loader.epoch(1))
    assert loader._stream is stream  # continued, not rebuilt
    fresh = _batches(root, epoch=1)
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(second, fresh, strict=True))
    assert len(first) == loader.steps_per_epoch


def test_rank_shards_disjoint_and_equal(root):
    seen = []
    for rank in range(3):
        batches = _batches(root, rank=rank, world_size=3, batch_size=1)
        assert len(batches) == 2  # 8 videos // 3 ranks = 2 each, remainder dropped
        seen += [int(b["video_index"]) for b in batches]
    assert len(set(seen)) == 6


@pytest.mark.parametrize("modalities", [("rgb",), ("flow",)])
def test_dali_matches_baseline_crop_flip_resize(root, modalities):
    kw = dict(modalities=modalities, colour=False, segments="spread", pair_mode="coclr")
    dali, baseline = _batches(root, backend="dali", **kw), _batches(root, backend="baseline", **kw)
    assert len(dali) == 4  # and as many from the baseline (strict zip): one that stopped early passed once
    for a, b in zip(dali, baseline, strict=True):
        for key in a:
            diff = (a[key].float() - b[key].float()).abs()
            levels = diff * (0.225 * 255 if modalities == ("rgb",) else 128)  # back to 8-bit levels
            assert levels.max() <= 12 and levels.mean() <= 2, key  # INTER_AREA vs antialiased linear


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_weak_augment_is_crop_and_flip_only_and_coclr_mixes(root, backend):
    kw = dict(backend=backend, segments="spread", pair_mode="coclr")
    weak, plain = _batches(root, augment="weak", **kw), _batches(root, colour=False, **kw)
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(weak, plain, strict=True))  # no colour, no blur
    standard, mixed = _batches(root, **kw), _batches(root, augment="coclr", **kw)
    copies = lambda batches: torch.cat([b["rgb"] for b in batches]).flatten(0, 1)  # [N * 2, 3, T, H, W]
    same_as = lambda x, y: [torch.equal(a, b) for a, b in zip(copies(x), copies(y), strict=True)]
    # every coclr copy is the standard (strong) copy or the weak one, and both kinds occur
    strong, crop_flip = same_as(mixed, standard), same_as(mixed, weak)
    assert all(s or w for s, w in zip(strong, crop_flip, strict=True)) and any(strong) and not all(strong)


def _corrupt(frame_bytes):
    def mutate(encoded):
        for video in encoded:
            video.rgb[3] = frame_bytes(video.rgb[3])
    return mutate


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_corrupt_flow_frame_is_named_by_the_frame_stored(tmp_path, backend):
    """A clip's last RGB frame reads flow frame n - 2 (there is no flow after the last frame): the
    error names that flow frame, not the RGB index it was read for (n - 1, which has no flow)."""
    def damage_last_flow_x(encoded):
        for video in encoded:
            x, y = video.flow[-1]
            video.flow[-1] = (x[:2] + b"\x00" * 64 + x[-2:], y)  # markers intact: only the decoder sees it

    root = write_toy_dataset(tmp_path, num_videos=4, num_frames=8, mutate=damage_last_flow_x)
    with pytest.raises((CorruptFrameError, RuntimeError), match=r"video v_class\d_g\d\d_c\d\d flow-x frame 6\b"):
        _batches(root, backend=backend, modalities=("flow",), frames_per_clip=2, frame_stride=7, num_segments=1)


@pytest.mark.parametrize("how", ["truncated", "garbage_inside_markers"])
@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_corrupt_jpeg_names_video_and_frame(tmp_path, how, backend):
    damage = (lambda b: b[: len(b) // 2]) if how == "truncated" else (lambda b: b[:2] + b"\x00" * 64 + b[-2:])
    root = write_toy_dataset(tmp_path, num_videos=4, num_frames=8, with_flow=False, mutate=_corrupt(damage))
    start = time.monotonic()
    with pytest.raises((CorruptFrameError, RuntimeError), match=r"video v_class\d_g\d\d_c\d\d rgb frame 3"):
        _batches(root, backend=backend, num_workers=1)
    assert time.monotonic() - start < 30


@pytest.mark.multiprocess
def test_parallel_workers_give_the_same_batches(root):
    inline = _batches(root, epoch=1, modalities=("rgb", "flow"))
    parallel = _batches(root, epoch=1, modalities=("rgb", "flow"), num_workers=2)
    assert len(inline) == len(parallel) == 4  # strict zip below: a loader that stopped early passed once
    for a, b in zip(inline, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
