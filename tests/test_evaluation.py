"""The evaluation loaders: every window once, in order; centre and ten crops; DALI = baseline."""

import pytest
import torch

from cvtcl.data import build_eval_loader
from dali_pipelines.sampling import eval_windows
from dali_pipelines.toy_shards import write_toy_dataset

KW = dict(frames_per_clip=8, window_stride=8, crop_size=16, batch_size=3, num_workers=0, num_threads=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_videos=4, num_frames=20, num_short=1)


def test_every_window_once_in_order(root):
    loader = build_eval_loader(root, **KW)
    batches = list(loader)
    expected = [v for v, _ in eval_windows(loader.videos, 8, 8)]
    assert torch.cat([b["video_index"] for b in batches]).tolist() == expected
    assert batches[0]["rgb"].shape == (3, 1, 3, 8, 16, 16)
    assert batches[-1]["rgb"].shape[0] == len(expected) - 3 * (len(batches) - 1)
    again = list(loader)  # a second pass gives the same batches
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_ten_crop_flips_and_baseline_agreement(root, modality):
    dali = list(build_eval_loader(root, modality=modality, crops="ten", **KW))
    base = list(build_eval_loader(root, modality=modality, crops="ten", backend="baseline", **KW))
    scale = 0.225 * 255 if modality == "rgb" else 128
    assert sum(len(b["label"]) for b in dali) == len(eval_windows(build_eval_loader(root, **KW).videos, 8, 8))
    for a, b in zip(dali, base, strict=True):
        x = a[modality]  # [B, 10, C, T, H, W]
        assert x.shape[1] == 10
        mirrored = x[:, :5].flip(-1)
        if modality == "flow":
            mirrored[:, :, 0] = -mirrored[:, :, 0]
        assert torch.equal(x[:, 5:], mirrored)  # views 5..9 are views 0..4 flipped (flow-x negated)
        assert not torch.equal(x[:, 0], x[:, 3])  # corners differ
        diff = (x - b[modality]).abs() * scale
        assert diff.max() <= 12 and diff.mean() <= 2
        assert torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_videos_selects_those_videos_in_the_given_order(root, backend):
    full = build_eval_loader(root, backend=backend, **KW)
    names = [full.videos[2].name, full.videos[0].name]
    by_name = build_eval_loader(root, backend=backend, videos=names, **KW)
    by_index = build_eval_loader(root, backend=backend, videos=[2, 0], **KW)
    assert [v.name for v in by_name.videos] == names == [v.name for v in by_index.videos]
    picked = list(by_name)
    indices = torch.cat([b["video_index"] for b in picked])
    assert indices.tolist() == [v for v, _ in eval_windows(by_name.videos, 8, 8)]  # video 2's windows, then 0's
    assert indices.tolist() == sorted(indices.tolist()) and set(indices.tolist()) == {0, 1}
    assert torch.cat([b["label"] for b in picked]).tolist() == [by_name.videos[i].label for i in indices]
    # the same clips as in the full pass
    whole = list(full)
    full_index, full_rgb = torch.cat([b["video_index"] for b in whole]), torch.cat([b["rgb"] for b in whole])
    expected = torch.cat([full_rgb[full_index == 2], full_rgb[full_index == 0]])
    assert torch.equal(torch.cat([b["rgb"] for b in picked]), expected)
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(picked, by_index, strict=True))
    with pytest.raises(ValueError, match="not in this split"):
        build_eval_loader(root, backend=backend, videos=["v_nope"], **KW)
    with pytest.raises(ValueError, match="twice"):
        build_eval_loader(root, backend=backend, videos=[1, 1], **KW)
