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
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(batches, again))


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_ten_crop_flips_and_baseline_agreement(root, modality):
    dali = list(build_eval_loader(root, modality=modality, crops="ten", **KW))
    base = list(build_eval_loader(root, modality=modality, crops="ten", backend="baseline", **KW))
    scale = 0.225 * 255 if modality == "rgb" else 128
    for a, b in zip(dali, base):
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
