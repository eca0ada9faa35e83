"""Held-out train videos are drawn by source group; the best held-out state is what is restored."""

import pytest
from torch import nn

from cvtcl.selection import BestState, heldout_split
from eval_fakes import make_videos


def test_heldout_split_keeps_groups_whole_and_every_class_fitted():
    videos = make_videos(num_classes=4, per_class=12, groups_per_class=6)
    fit, held = heldout_split(videos, fraction=0.3, seed=0)
    assert sorted(fit + held) == list(range(len(videos)))
    fit_groups = {videos[i].group for i in fit}
    held_groups = {videos[i].group for i in held}
    assert not fit_groups & held_groups
    assert {videos[i].label for i in fit} == {0, 1, 2, 3}
    assert {videos[i].label for i in held} == {0, 1, 2, 3}
    assert len(held_groups) == 4 * 2  # round(0.3 * 6) groups per class
    assert heldout_split(videos, 0.3, seed=0) == (fit, held)
    assert heldout_split(videos, 0.3, seed=1) != (fit, held)


def test_a_large_fraction_still_leaves_a_group_of_every_class_to_fit():
    """round(0.9 * 2) = 2 would hold out both groups of each class: one is kept to fit."""
    videos = make_videos(num_classes=3, per_class=4, groups_per_class=2)
    fit, held = heldout_split(videos, fraction=0.9, seed=0)
    assert {videos[i].label for i in fit} == {videos[i].label for i in held} == {0, 1, 2}
    assert len({videos[i].group for i in held}) == 3  # one group per class


def test_heldout_split_needs_two_groups_somewhere():
    with pytest.raises(ValueError, match="single source group"):
        heldout_split(make_videos(groups_per_class=1), 0.2)
    with pytest.raises(ValueError, match="fraction"):
        heldout_split(make_videos(), 1.0)


def test_best_state_restores_best_and_keeps_earliest_tie():
    layer = nn.Linear(1, 1, bias=False)
    best = BestState()
    for epoch, (weight, score) in enumerate([(1.0, 10.0), (2.0, 30.0), (3.0, 30.0), (4.0, 5.0)]):
        layer.weight.data.fill_(weight)
        best.update(layer, score, epoch)
    best.restore(layer)
    assert layer.weight.item() == 2.0 and best.epoch == 1 and best.score == 30.0
    with pytest.raises(RuntimeError):
        BestState().restore(layer)
