"""The data factory: argument checks and the missing-DALI error."""

import importlib.util

import pytest
import torch

from cvtcl import data
from dali_pipelines.toy_shards import write_toy_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), num_videos=4, num_frames=10, with_flow=False)


def test_missing_dali_names_the_package(root, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("nvidia.dali") else real(name, *a))
    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        data.build_pretrain_loader(root, batch_size=2)
    loader = data.build_pretrain_loader(root, batch_size=2, backend="baseline", frames_per_clip=4, crop_size=8,
                                        num_segments=2, num_workers=0)
    assert next(loader.epoch(0))["rgb"].shape == (2, 2, 3, 4, 8, 8)


def test_bad_arguments_are_refused(root):
    with pytest.raises(ValueError, match="backend"):
        data.build_pretrain_loader(root, batch_size=2, backend="ffcv")
    with pytest.raises(ValueError, match="without flow"):
        data.build_pretrain_loader(root, batch_size=2, modalities=("flow",))
    with pytest.raises(ValueError, match="crops"):
        data.build_eval_loader(root, crops="five")
    with pytest.raises(ValueError, match="quarters"):
        data.build_pretrain_loader(root, batch_size=2, pair_mode="independent")


def test_baseline_float16_and_resume(root):
    kw = dict(batch_size=1, frames_per_clip=4, crop_size=8, num_segments=2, num_workers=0, backend="baseline")
    loader = data.build_pretrain_loader(root, dtype=torch.float16, **kw)
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=2))
    assert full[0]["rgb"].dtype == torch.float16 and len(full) == 4
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(full[2:], tail))


def test_real_synthetic_dataset_both_backends(synthetic_dataset):
    """The packed output of `cvtcl-preprocess synthetic` (TV-L1 flow, splits, groups) loads."""
    kw = dict(batch_size=2, frames_per_clip=8, crop_size=16, num_segments=2, num_workers=0, num_threads=1,
              modalities=("rgb", "flow"))
    for backend in ("dali", "baseline"):
        loader = data.build_pretrain_loader(synthetic_dataset, backend=backend, **kw)
        batches = list(loader.epoch(0))
        assert len(batches) == loader.steps_per_epoch >= 1
        for batch in batches:
            assert batch["rgb"].shape == (2, 2, 3, 8, 16, 16) and batch["flow"].shape == (2, 2, 2, 8, 16, 16)
            assert torch.isfinite(batch["rgb"]).all() and batch["flow"].abs().max() <= 1
            names = [loader.videos[i].name for i in batch["video_index"].tolist()]
            assert all(n.startswith("v_") for n in names)
        evaluation = data.build_eval_loader(synthetic_dataset, backend=backend, frames_per_clip=8, window_stride=8,
                                            crop_size=16, crops="ten", batch_size=4, num_workers=0, num_threads=1)
        seen = {int(i) for b in evaluation for i in b["video_index"]}
        assert seen == set(range(len(evaluation.videos)))
