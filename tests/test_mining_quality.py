"""benchmarks/mining_quality.py: the offline mining precision of a sampler, and its command line."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import mining_quality  # noqa: E402
from benchmarks.common import write_toy_shards  # noqa: E402
from dali_pipelines.toy_shards import write_toy_dataset  # noqa: E402
from cvtcl.checkpoint import save_checkpoint  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402
from cvtcl.models import Encoder  # noqa: E402
from cvtcl.moco import MomentumContrast  # noqa: E402
from trainer_fakes import one_thread  # noqa: E402, F401 (autouse fixture)


def test_class_aligned_embeddings_mine_perfectly_and_own_group_is_excluded():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    embeddings = F.one_hot(labels, 2).float() + 0.01 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    result = mining_quality.mine(F.normalize(embeddings, dim=1), labels, groups, topk=2)
    assert result["precision"] == 1.0  # the 2 same-class videos of the other group
    assert abs(result["chance"] - 2 / 6) < 1e-6  # 6 admissible per video (own group excluded), 2 of its class
    shuffled = mining_quality.mine(F.normalize(embeddings, dim=1), labels[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])],
                                   groups, topk=2)
    assert shuffled["precision"] < 1.0  # the same embeddings, classes no longer aligned with them


def test_command_line_on_the_synthetic_shards(synthetic_dataset, tmp_path, capsys):
    encoder = Encoder("flow", "tiny")
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "model": MomentumContrast(encoder, 8).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": {}, "complete": True}
    path = save_checkpoint(tmp_path, state)
    assert mining_quality.main([str(path), "--data", str(synthetic_dataset), "--frames", "8", "--topk", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["sampler"] for r in record["rows"]] == [str(path), "untrained flow"]
    assert record["device"].startswith("CPU ") and record["versions"]["torch"] == torch.__version__
    assert all(0.0 <= r["precision"] <= 1.0 for r in record["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--topk", "0"], "argument --topk: a whole number >= 1, got '0'"),  # was NaN, and NaN in the JSON line
    (["--topk", "-1"], "argument --topk: a whole number >= 1, got '-1'"),
    (["--crop", "0"], "argument --crop: a whole number >= 1"),
    (["--frames", "0"], "argument --frames: a whole number >= 1"),  # was a numpy traceback
    (["--subset", "foo"], "--subset foo: split 1 of .* has the subsets test, train"),  # was a KeyError traceback
])
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, argv, message):
    root = write_toy_shards(tmp_path / "shards", size="24x32", num_videos=2, frames=4)
    checkpoint = tmp_path / "checkpoint-1.pt"
    checkpoint.touch()  # not read: the flags are refused first
    with pytest.raises(UsageError, match=message):
        mining_quality.main([str(checkpoint), "--data", str(root), *argv])


def test_a_subset_of_one_source_group_is_refused_before_mining(tmp_path):
    """Mining skips a video's own source group: with one group nothing is admissible, and the
    precision was a bare NaN in the JSON line (not JSON)."""
    def one_group(encoded):
        for i, video in enumerate(encoded):
            encoded[i] = dataclasses.replace(video, record=dataclasses.replace(video.record, group="g"))

    root = write_toy_dataset(tmp_path / "shards", num_videos=3, num_frames=12, with_flow=False, mutate=one_group)
    encoder = Encoder("rgb", "tiny")
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "model": MomentumContrast(encoder, 8).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": {}, "complete": True}
    path = save_checkpoint(tmp_path, state)
    with pytest.raises(UsageError, match="every video comes from one source group"):
        mining_quality.main([str(path), "--data", str(root), "--frames", "8", "--topk", "1"])
