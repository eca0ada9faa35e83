"""Model selection on a held-out part of the training split, never on the test split.

The authors' release picked the linear-probe and fine-tune checkpoints by test accuracy
(docs/algorithm.md "Known defects"); here the epoch is chosen on held-out train videos and the test
split is scored once, with the selected weights. The held-out part is drawn by source group
(UCF101 `v_Class_gXX_cYY`: the clips of one group are cut from one recording), so that held-out
videos are not near-copies of training videos and the selection signal is not inflated.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

from torch import nn

from preprocess.schema import VideoRecord


def heldout_split(
    videos: Sequence[VideoRecord], fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices) into `videos`, holding out ~`fraction` of each class's groups.

    Every class keeps at least one group for fitting; a class with a single group contributes no
    held-out video. Deterministic in (video names, fraction, seed).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    groups_by_class: dict[int, list[str]] = {}
    for video in videos:
        groups = groups_by_class.setdefault(video.label, [])
        if video.group not in groups:
            groups.append(video.group)
    rng = random.Random(seed)
    held_groups: set[str] = set()
    for label in sorted(groups_by_class):
        groups = sorted(groups_by_class[label])
        count = min(len(groups) - 1, max(1, round(fraction * len(groups)))) if len(groups) > 1 else 0
        held_groups.update(rng.sample(groups, count))
    held = [i for i, v in enumerate(videos) if v.group in held_groups]
    fit = [i for i, v in enumerate(videos) if v.group not in held_groups]
    if not held:
        raise ValueError("no held-out video: every class has a single source group; "
                         "model selection needs at least two groups in some class")
    return fit, held


class BestState:
    """Keeps a copy of the weights with the best held-out score seen so far (ties: earliest)."""

    def __init__(self) -> None:
        self.score = float("-inf")
        self.epoch = -1
        self.state: dict | None = None

    def update(self, module: nn.Module, score: float, epoch: int) -> bool:
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.state = copy.deepcopy(module.state_dict())
            return True
        return False

    def restore(self, module: nn.Module) -> None:
        if self.state is None:
            raise RuntimeError("no held-out evaluation ran, so there is no selected state to restore")
        module.load_state_dict(self.state)
