"""The linear probe separates separable features and never looks at the test labels to select."""

import pytest
import torch
from rich.console import Console

from cvtcl.features import VideoFeatures
from cvtcl.linear_probe import (LinearProbeConfig, linear_probe, make_probe, predict_probabilities, top1,
                                train_linear_probe)
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


def test_epoch_is_scored_on_the_heldout_set_not_the_fit_set():
    """The held-out labels here are the fit labels swapped: a probe that learns the fit set scores
    ~0 on them. The reported score must be the held-out one of the restored weights, not fit accuracy."""
    videos = make_videos(num_classes=2, per_class=8, groups_per_class=4)
    feats = separable(videos, dim=4)
    fit, held = heldout_split(videos, 0.25)
    fit_feats = feats.subset(torch.tensor(fit))
    held_feats = feats.subset(torch.tensor(held))
    swapped = VideoFeatures(held_feats.features, 1 - held_feats.labels, held_feats.videos)
    outcome = train_linear_probe(fit_feats, swapped, 2, LinearProbeConfig(epochs=6, batch_size=4, lr=1e-2))
    assert outcome.heldout_top1 == top1(predict_probabilities(outcome.probe, swapped.features), swapped.labels)
    assert outcome.heldout_top1 < 50.0 < top1(predict_probabilities(outcome.probe, fit_feats.features),
                                               fit_feats.labels)


def test_two_stream_averages_probabilities_not_their_product(monkeypatch):
    """Mean (or sum) of the two softmaxes, as CoCLR fuses streams: a stream that is sure of a wrong
    class outvotes a hesitant one under the mean, while a product lets a single near-zero veto it.
    predict_probabilities is replaced by "the features are the probabilities" to pin exact values."""
    monkeypatch.setattr("cvtcl.linear_probe.predict_probabilities", lambda probe, features: features.float())
    videos = make_videos(num_classes=3, per_class=4, groups_per_class=2)
    train = {m: separable(videos, dim=3, seed=s) for m, s in (("rgb", 0), ("flow", 1))}
    fit, held = heldout_split(videos, 0.5)
    test_videos = make_videos(num_classes=2, per_class=1, prefix="te")  # labels 0, 1
    rgb = torch.tensor([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10]])  # right on both
    flow = torch.tensor([[0.01, 0.50, 0.49], [0.70, 0.05, 0.25]])  # wrong on both
    assert (rgb * flow).argmax(1).tolist() == [1, 0]  # a product would be wrong on both
    labels = torch.tensor([0, 1])
    test = {"rgb": VideoFeatures(rgb, labels, test_videos), "flow": VideoFeatures(flow, labels, test_videos)}
    results = linear_probe(train, test, fit, held, 3, LinearProbeConfig(epochs=1, batch_size=4))
    assert (results["rgb"]["top1"], results["flow"]["top1"], results["two-stream"]["top1"]) == (100.0, 0.0, 100.0)


def test_predictions_are_made_in_eval_mode():
    """BN uses its running statistics when predicting: a video's probabilities do not depend on
    which other videos share its batch (a batch of one would not even run in train mode), and the
    probe's train/eval state is left as it was."""
    videos = make_videos(num_classes=2, per_class=6, groups_per_class=3)
    feats = separable(videos, dim=4)
    probe = make_probe(feats.features, 2)
    probe.train()
    probe(feats.features)  # move the running statistics away from their initial values
    together = predict_probabilities(probe, feats.features)
    alone = predict_probabilities(probe, feats.features[3:4])
    assert torch.allclose(alone[0], together[3], atol=1e-6)
    assert torch.allclose(predict_probabilities(probe, feats.features[:5]), together[:5], atol=1e-6)
    assert probe.training


def test_probe_standardises_features_with_fit_statistics():
    """Columns at scales 1e-3, 1 and 10 all reach BN with mean 0 and std 1 (the fit set's
    statistics), so no column is flattened by BN's eps or dominates by scale."""
    generator = torch.Generator().manual_seed(0)
    scale, offset = torch.tensor([1e-3, 1.0, 10.0]), torch.tensor([3e-3, -2.0, 70.0])
    features = torch.randn(40, 3, generator=generator) * scale + offset
    standardise = make_probe(features, 2)[0]
    out = standardise(features)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(0), torch.ones(3), atol=1e-3)
    other = standardise(features[:10] * 2)  # applied with the fit statistics, not recomputed
    assert torch.allclose(other, (features[:10] * 2 - features.mean(0)) / features.std(0), atol=1e-4)
