"""Linear probe: batch norm + a linear classifier on frozen backbone features (paper §3.2, Table 2).

The backbone is frozen, so its features are computed once (`cvtcl.features.extract_features`:
per video, mean over sliding windows, centre crop) and the probe trains on those tensors: seconds
instead of one backbone pass per epoch. Training on the video mean is the same as averaging the
window logits at test time, because BN (in eval mode) and the linear layer are both affine.
The epoch is selected on held-out train videos (`cvtcl.selection`), the test split is scored once.
Two-stream classification averages the two probes' softmax probabilities.

Optimiser: Adam, lr 1e-3, by default (our choice: on z-scored, precomputed features it converges
within the 100 epochs at any feature scale without tuning, and the demo's numbers were measured
with it). CoCLR's linear probe uses SGD with lr 0.1 instead; `optimizer="sgd"` (momentum 0.9)
with `lr=0.1` is that setting (`python -m cvtcl.eval linear --probe-optimizer sgd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cvtcl.features import VideoFeatures
from cvtcl.selection import BestState


OPTIMIZERS = ("adam", "sgd")


@dataclass
class LinearProbeConfig:
    epochs: int = 100  # features are fixed tensors, so epochs are cheap; selection picks the best
    batch_size: int = 256  # mini-batches keep BN's batch statistics meaningful
    lr: float = 1e-3  # for Adam (our default); CoCLR's SGD probe uses 0.1
    weight_decay: float = 1e-3  # CoCLR's setting; the held-out split guards against over-fitting
    seed: int = 0  # initialisation and batch order
    optimizer: str = "adam"  # "adam" (our choice, see the module docstring) or "sgd" (CoCLR's, momentum 0.9)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"linear probe needs epochs >= 1 and batch_size >= 2 (BN), got {self}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"linear probe optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"linear probe needs lr > 0 and weight_decay >= 0, got {self}")


@dataclass
class ProbeResult:
    probe: nn.Module
    selected_epoch: int  # 0-based, an index into history (results count from 1, see linear_probe)
    heldout_top1: float  # percent, of the selected epoch
    history: list[float] = field(default_factory=list)  # held-out top-1 per epoch


class Standardise(nn.Module):
    """Fixed per-dimension z-scoring with statistics of the fit set: [N, F] -> [N, F].

    Why: BN's eps (1e-5) is added to the batch variance, and an untrained network's features can
    be tiny (measured: std ~1e-4 for a random-init flow encoder, variance ~1e-8), so BN alone would
    scale them down by eps and leave the linear layer an almost constant input. z-scoring first
    makes the probe invariant to the feature scale; it is affine, so the probe stays linear.
    """

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).clamp_min(1e-12 + 1e-6 * features.std(0).max().item()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_probe(fit_features: torch.Tensor, num_classes: int) -> nn.Module:
    """z-score, BN (CoCLR's `final_bn`), linear: features [N, F] -> logits [N, num_classes]."""
    feature_dim = fit_features.shape[1]
    return nn.Sequential(Standardise(fit_features), nn.BatchNorm1d(feature_dim), nn.Linear(feature_dim, num_classes))


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose arg-max of scores [N, C] equals labels [N]."""
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def predict_probabilities(probe: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities [N, C] of features [N, F] with the probe in eval mode."""
    was_training = probe.training
    probe.eval()
    with torch.no_grad():
        probs = probe(features.float()).softmax(1)
    probe.train(was_training)
    return probs


def train_linear_probe(
    fit: VideoFeatures, heldout: VideoFeatures, num_classes: int, config: LinearProbeConfig | None = None
) -> ProbeResult:
    """Train on `fit`, select the epoch with the best held-out top-1; the probe holds those weights."""
    config = config or LinearProbeConfig()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the probe's initialisation
    probe = make_probe(fit.features, num_classes)
    if config.optimizer == "sgd":
        optimiser = torch.optim.SGD(probe.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.Adam(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, history = BestState(), []
    count = len(fit.labels)
    for epoch in range(config.epochs):
        probe.train()
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, config.batch_size):
            rows = order[start : start + config.batch_size]
            if len(rows) < 2:  # BN cannot normalise a batch of one
                continue
            loss = nn.functional.cross_entropy(probe(fit.features[rows]), fit.labels[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        score = top1(predict_probabilities(probe, heldout.features), heldout.labels)
        history.append(score)
        best.update(probe, score, epoch)
    best.restore(probe)
    probe.eval()
    return ProbeResult(probe, best.epoch, best.score, history)


def linear_probe(
    train: dict[str, VideoFeatures],
    test: dict[str, VideoFeatures],
    fit_index: list[int],
    heldout_index: list[int],
    num_classes: int,
    config: LinearProbeConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 on test per modality and, with both, "two-stream" (mean of the two probabilities).

    train/test: {"rgb"|"flow": VideoFeatures}; fit_index/heldout_index split the train rows
    (`cvtcl.selection.heldout_split`). Returns {stream: {"top1", "heldout_top1", "epoch"}}, where
    "epoch" is the selected epoch counted from 1 (as the fine-tune's progress lines count them);
    "two-stream" has none, as each stream keeps its own (the table shows "-").
    """
    results: dict[str, dict[str, float]] = {}
    probabilities: dict[str, torch.Tensor] = {}
    fit_rows, held_rows = torch.tensor(fit_index), torch.tensor(heldout_index)
    for modality in sorted(train):
        feats = train[modality]
        outcome = train_linear_probe(feats.subset(fit_rows), feats.subset(held_rows), num_classes, config)
        probabilities[modality] = predict_probabilities(outcome.probe, test[modality].features)
        held_probs = predict_probabilities(outcome.probe, feats.features[held_rows])
        probabilities[modality + "/heldout"] = held_probs
        results[modality] = {
            "top1": top1(probabilities[modality], test[modality].labels),
            "heldout_top1": outcome.heldout_top1,
            "epoch": outcome.selected_epoch + 1,
        }
    if len(train) == 2:
        test_labels = test["rgb"].labels
        held_labels = train["rgb"].labels[held_rows]
        results["two-stream"] = {
            "top1": top1(probabilities["rgb"] + probabilities["flow"], test_labels),
            "heldout_top1": top1(probabilities["rgb/heldout"] + probabilities["flow/heldout"], held_labels),
        }
    return results
