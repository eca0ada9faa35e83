"""The linear probe separates separable features and never looks at the test labels to select."""

import pytest
import torch
from rich.console import Console

from cvtcl.features import VideoFeatures
from cvtcl.linear_probe import LinearProbeConfig, linear_probe, train_linear_probe
from cvtcl.report import print_table, results_table
from cvtcl.selection import heldout_split
from eval_fakes import make_videos


def separable(videos, dim=32, seed=0, scale=1.0):
    """Class means far apart along random directions plus small isotropic noise: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([v.label for v in videos])
    means = 4.0 * torch.randn(int(labels.max()) + 1, dim, generator=torch.Generator().manual_seed(99))
    feats = scale * (means[labels] + 0.3 * torch.randn(len(videos), dim, generator=generator)) + 7.0
    return VideoFeatures(feats, labels, list(videos))


@pytest.mark.parametrize("config", [LinearProbeConfig(epochs=30, batch_size=16, lr=1e-2),
                                    LinearProbeConfig(epochs=30, batch_size=16, lr=0.1, optimizer="sgd")],
                         ids=["adam", "sgd-as-coclr"])
def test_probe_reaches_full_accuracy_on_separable_features(config):
    train_videos = make_videos(num_classes=5, per_class=20, groups_per_class=5, prefix="tr")
    test_videos = make_videos(num_classes=5, per_class=10, groups_per_class=5, prefix="te")
    train, test = separable(train_videos, seed=0), separable(test_videos, seed=1)
    fit, held = heldout_split(train_videos, 0.2)
    results = linear_probe({"rgb": train}, {"rgb": test}, fit, held, 5, config)
    assert results["rgb"]["top1"] >= 99.0
    assert results["rgb"]["heldout_top1"] >= 99.0


def test_probe_is_invariant_to_feature_scale():
    """An untrained encoder's features can have std ~1e-4: BN's eps alone would flatten them."""
    train_videos = make_videos(num_classes=4, per_class=12, groups_per_class=4, prefix="tr")
    test_videos = make_videos(num_classes=4, per_class=6, groups_per_class=3, prefix="te")
    fit, held = heldout_split(train_videos, 0.25)
    config = LinearProbeConfig(epochs=15, batch_size=8, lr=1e-2)
    tiny = {"rgb": separable(train_videos, seed=0, scale=1e-4)}, {"rgb": separable(test_videos, seed=1, scale=1e-4)}
    assert linear_probe(*tiny, fit, held, 4, config)["rgb"]["top1"] >= 99.0


def test_two_stream_averages_probabilities():
    train_videos = make_videos(num_classes=3, per_class=10, groups_per_class=5, prefix="tr")
    test_videos = make_videos(num_classes=3, per_class=6, groups_per_class=3, prefix="te")
    fit, held = heldout_split(train_videos, 0.2)
    config = LinearProbeConfig(epochs=5, batch_size=8)
    train = {"rgb": separable(train_videos, seed=0), "flow": separable(train_videos, seed=2, scale=0.01)}
    test = {"rgb": separable(test_videos, seed=1), "flow": separable(test_videos, seed=3, scale=0.01)}
    results = linear_probe(train, test, fit, held, 3, config)
    assert set(results) == {"rgb", "flow", "two-stream"}
    assert 0.0 <= results["two-stream"]["top1"] <= 100.0


def test_results_count_epochs_from_one_and_two_stream_has_none():
    """The selected epoch as people count it (a one-epoch probe selects epoch 1); the two-stream row
    has no epoch of its own, shown as '-' rather than a made-up number."""
    train_videos = make_videos(num_classes=3, per_class=10, groups_per_class=5, prefix="tr")
    test_videos = make_videos(num_classes=3, per_class=6, groups_per_class=3, prefix="te")
    fit, held = heldout_split(train_videos, 0.2)
    train = {"rgb": separable(train_videos, seed=0), "flow": separable(train_videos, seed=2)}
    test = {"rgb": separable(test_videos, seed=1), "flow": separable(test_videos, seed=3)}
    results = linear_probe(train, test, fit, held, 3, LinearProbeConfig(epochs=1, batch_size=8))
    assert results["rgb"]["epoch"] == results["flow"]["epoch"] == 1
    assert "epoch" not in results["two-stream"]
    console = Console(record=True, width=200)
    print_table(results_table("linear", results), console)
    (row,) = [line for line in console.export_text().splitlines() if "two-stream" in line]
    assert row.split("│")[-2].strip() == "-", row  # the epoch column


def test_selection_ignores_test_labels():
    videos = make_videos(num_classes=3, per_class=10, groups_per_class=5)
    feats = separable(videos, dim=8)
    fit, held = heldout_split(videos, 0.2)
    config = LinearProbeConfig(epochs=8, batch_size=8, lr=1e-2)
    test = separable(make_videos(num_classes=3, per_class=4, prefix="te"), dim=8, seed=5)
    shuffled = VideoFeatures(test.features, test.labels.roll(1), test.videos)
    a = linear_probe({"rgb": feats}, {"rgb": test}, fit, held, 3, config)["rgb"]
    b = linear_probe({"rgb": feats}, {"rgb": shuffled}, fit, held, 3, config)["rgb"]
    assert (a["epoch"], a["heldout_top1"]) == (b["epoch"], b["heldout_top1"])
    assert a["top1"] != b["top1"]


def test_probe_keeps_weights_of_selected_epoch():
    videos = make_videos(num_classes=2, per_class=8, groups_per_class=4)
    feats = separable(videos, dim=4)
    fit, held = heldout_split(videos, 0.25)
    rows = torch.tensor(fit), torch.tensor(held)
    outcome = train_linear_probe(feats.subset(rows[0]), feats.subset(rows[1]), 2,
                                 LinearProbeConfig(epochs=6, batch_size=4))
    assert len(outcome.history) == 6
    assert outcome.heldout_top1 == max(outcome.history) == outcome.history[outcome.selected_epoch]
    assert not outcome.probe.training


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer='lbfgs': choose one of adam, sgd"):
        LinearProbeConfig(optimizer="lbfgs")
