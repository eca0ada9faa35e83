"""End-to-end fine-tuning for action classification (paper §3.2, Table 4; CoCLR's protocol).

The pretrained backbone gets dropout 0.9 + a linear classifier and everything trains with Adam,
lr 1e-3 for the new head and 1e-4 for the backbone (it already holds a representation; the head
starts from nothing), weight decay 1e-3. The epoch is selected on held-out train videos
(`cvtcl.selection`), scored with the centre crop; the test split is scored once with the selected
weights and ten crops (4 corners + centre, x 2 flips), the softmax averaged over every sliding
window and crop of a video. Two-stream: the mean of the two streams' video probabilities.

Training clips come from the pretraining loader (`build_pretrain_loader`; copy 0 of each pair) over
the train videos less the held-out ones, so every step has its full batch, with
`FinetuneConfig.augment` = "weak": random resized crop and flip, no colour jitter, grayscale or
blur. CoCLR fine-tunes with a weaker augmentation than it pretrains with (crop, flip, colour
jitter with p 0.3, no grayscale or blur); the loader has no jitter-at-p-0.3 strength, so "weak" is
the closest it offers, and "standard" (the pretraining list) is the other choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cvtcl import distributed
from cvtcl.checkpoint import load_checkpoint, save_atomic
from cvtcl.features import average_over_windows, inference_mode, loader_labels
from cvtcl.linear_probe import top1
from cvtcl.selection import BestState


@dataclass
class FinetuneConfig:
    epochs: int = 500  # CoCLR fine-tunes for hundreds of epochs on UCF101
    lr_head: float = 1e-3  # the new classifier starts from scratch
    lr_backbone: float = 1e-4  # 10x smaller: keep what pretraining learned
    weight_decay: float = 1e-3
    dropout: float = 0.9  # CoCLR's heavy dropout; UCF101 is small for a full S3D
    lr_drops: tuple[float, ...] = (0.8, 0.9)  # lr x 0.1 at these fractions of the epochs (our choice)
    augment: str = "weak"  # training clips: crop + flip (CoCLR: + jitter p 0.3; see the module docstring)
    eval_every: int = 5  # held-out scoring decodes ~10% of train videos x all windows: not every epoch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.eval_every < 1:
            raise ValueError(f"fine-tune needs epochs >= 1 and eval_every >= 1, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(not 0.0 < f < 1.0 for f in self.lr_drops):
            raise ValueError(f"lr_drops are fractions of the epochs in (0, 1), got {self.lr_drops}")


class Classifier(nn.Module):
    """encoder.features -> dropout -> linear: clips [N, C, T, H, W] -> logits [N, num_classes]."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.9):
        super().__init__()
        self.encoder = encoder
        if isinstance(getattr(encoder, "head", None), nn.Module):
            # the projection head is not part of features(): nothing trains it (and DDP needs every
            # trainable parameter to take part in the loss)
            encoder.head.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.encoder.features(clips)))

    def parameter_groups(self, lr_backbone: float, lr_head: float) -> list[dict[str, Any]]:
        # Frozen parameters (the encoder's projection head) get no gradient and Adam skips them.
        return [
            {"params": list(self.encoder.parameters()), "lr": lr_backbone},
            {"params": list(self.fc.parameters()), "lr": lr_head},
        ]


@dataclass
class FinetuneResult:
    model: Classifier
    selected_epoch: int  # 0-based, as in history; results and progress lines count from 1
    heldout_top1: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, held-out top-1)


def video_probabilities(
    model: nn.Module, loader: Any, *, modality: str | None = None, device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Softmax [V, num_classes] per video of `loader.videos`, averaged over windows and crops."""
    with inference_mode(model, "eval") as net:
        return average_over_windows(lambda clips: net(clips).softmax(1), loader, modality=modality, device=device,
                                    label=f"test {modality}", log=log)


def training_clips(batch: dict[str, Any], modality: str) -> torch.Tensor:
    """[B, C, T, H, W] from a pretraining batch ([B, V, C, T, H, W]: copy 0) or a plain clip batch."""
    clips = batch[modality]
    return clips[:, 0] if clips.dim() == 6 else clips


class ResumeFile:
    """A fine-tune's state after its last finished epoch, so that rerunning the same command after
    an interruption continues where it stopped, with the same result as an uninterrupted run.

    Holds the weights, optimizer, lr schedule, the best held-out weights so far, the history and
    every process's random number generators (dropout draws from them); written after every epoch
    (by the first process under torchrun) through a
    temporary file and a rename. `fingerprint`: what the result depends on (the encoder's source,
    the data, every setting); a file made with another one is never resumed (the caller keys the
    file name on it, so it is not overwritten either). A file that cannot be loaded is named and
    the fine-tune starts over.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path, self.fingerprint = Path(path), fingerprint

    def load(self, device: torch.device, log: Callable[[str], None] | None) -> dict[str, Any] | None:
        """The saved state, or None to start over (`log` says why when there was a file)."""
        if not self.path.is_file():
            return None
        try:
            state = load_checkpoint(self.path, map_location=device)
        except (RuntimeError, ValueError) as err:
            if log:
                log(f"{err}: fine-tuning from the start")
            return None
        if state.get("fingerprint") != self.fingerprint:
            if log:
                log(f"{self.path} was made with other settings: fine-tuning from the start")
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        save_atomic(self.path, {**state, "fingerprint": self.fingerprint})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def finetune(
    encoder: nn.Module,
    num_classes: int,
    train_loader: Any,
    heldout_loader: Any,
    heldout_names: Sequence[str],
    *,
    modality: str,
    device: str | torch.device = "cpu",
    config: FinetuneConfig | None = None,
    resume: ResumeFile | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `encoder` (in place) with a new head; return the classifier at the selected epoch.

    train_loader: `.videos`, `.steps_per_epoch` and `.epoch(e)` yielding {modality: clips, "label"},
    over the train videos that are not held out (`build_pretrain_loader(..., videos=...)`); at
    least two clips a step, as batch norm trains on batch statistics. heldout_loader: a centre-crop
    `EvalLoader` whose `.videos` include the held-out videos (others are ignored when scoring;
    `build_eval_loader(..., videos=heldout_names)` decodes the held-out videos alone).
    `resume`: continue from, and save after every epoch to, this file. `log`: one line per epoch.
    Under torchrun (a process group) the model trains as DDP: every process takes its share of each
    epoch from `train_loader` and scores the held-out videos itself (the same numbers everywhere).
    """
    config, device = config or FinetuneConfig(), torch.device(device)
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(config.seed)
    model = Classifier(encoder, num_classes, config.dropout).to(device)
    # under torchrun: DDP averages the gradients (and starts every rank from rank 0's weights); the
    # global batch is the processes x --batch-size, and each rank draws its own dropout masks
    net = model if world == 1 else DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if rank > 0:
        torch.manual_seed(config.seed + rank)
    optimiser = torch.optim.Adam(model.parameter_groups(config.lr_backbone, config.lr_head),
                                 weight_decay=config.weight_decay, fused=device.type == "cuda")  # one kernel
    milestones = sorted({max(1, round(f * config.epochs)) for f in config.lr_drops})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)

    held = set(heldout_names)
    trained_on = [v.name for v in train_loader.videos if v.name in held]
    if trained_on:
        raise ValueError(f"the fine-tune's train loader holds {len(trained_on)} held-out video(s) ({trained_on[0]}, ...); "
                         "build it on the other train videos")
    if train_loader.steps_per_epoch < 1 or train_loader.batch_size < 2:
        raise ValueError(f"the fine-tune's train loader gives {train_loader.steps_per_epoch} step(s) of "
                         f"{train_loader.batch_size} clip(s) an epoch; it needs steps of at least 2 (batch norm)")
    scored = torch.tensor([i for i, v in enumerate(heldout_loader.videos) if v.name in held])
    if len(scored) != len(held):
        raise ValueError(f"{len(held) - len(scored)} held-out videos are missing from the held-out loader")
    held_labels = torch.tensor([heldout_loader.videos[i].label for i in scored.tolist()])

    best, history, start = BestState(), [], 0
    saved = resume.load(device, log) if resume is not None else None
    if saved is not None:
        start, history = saved["epoch"], [tuple(h) for h in saved["history"]]
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best.score, best.epoch, best.state = saved["best_score"], saved["best_epoch"], saved["best_model"]
        set_rng_state(saved["rng"][rank], device)
        if log:
            log(f"fine-tune {modality}: resumed after epoch {start} of {config.epochs} from {resume.path}")
    for epoch in range(start, config.epochs):
        started = time.perf_counter()
        net.train()  # the DDP wrapper too, where there is one
        loss_sum, steps = torch.zeros((), device=device), 0
        for batch in train_loader.epoch(epoch):
            clips = training_clips(batch, modality).to(device)
            labels = batch["label"].to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(net(clips).float(), labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1  # read once per epoch, not per step
        schedule.step()
        mean = distributed.all_reduce_mean({"loss": loss_sum.item() / max(steps, 1)}, device)["loss"]
        line = f"fine-tune {modality}: epoch {epoch + 1}/{config.epochs}, loss {mean:.4f}, {time.perf_counter() - started:.1f} s"
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            probs = video_probabilities(model, heldout_loader, modality=modality, device=device)
            score = top1(probs[scored], held_labels)
            history.append((epoch, score))
            best.update(model, score, epoch)
            line += f"; held-out top-1 {score:.4f} (best {best.score:.4f} after epoch {best.epoch + 1})"
        if resume is not None:
            rng = distributed.gather_objects(rng_state(device))  # every rank's generators (a collective: all call it)
        if resume is not None and rank == 0:
            resume.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimiser.state_dict(),
                         "schedule": schedule.state_dict(), "best_score": best.score, "best_epoch": best.epoch,
                         "best_model": best.state, "history": history, "rng": rng})
        if log:
            log(line)
    best.restore(model)
    return FinetuneResult(model, best.epoch, best.score, history)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU's, and the GPU's on CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def classification_top1(
    models: dict[str, nn.Module], test_loaders: dict[str, Any], *, device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Ten-crop (or whatever the loaders yield) test top-1 per stream and, with two, "two-stream".

    models/test_loaders keyed by modality; the loaders must list the same videos in one order.
    `log`: progress lines of each stream's pass over the test split.
    """
    probs = {m: video_probabilities(models[m], test_loaders[m], modality=m, device=device, log=log)
             for m in sorted(models)}
    labels = loader_labels(next(iter(test_loaders.values())))
    results = {m: top1(p, labels) for m, p in probs.items()}
    if len(probs) == 2:
        if [v.name for v in test_loaders["rgb"].videos] != [v.name for v in test_loaders["flow"].videos]:
            raise ValueError("RGB and flow test loaders list different videos; two-stream needs one order")
        results["two-stream"] = top1((probs["rgb"] + probs["flow"]) / 2, labels)
    return results
