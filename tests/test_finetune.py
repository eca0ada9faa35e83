"""Fine-tuning: ten-crop/window softmax averaging, two-stream fusion, held-out videos kept out, lr groups."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cvtcl.finetune import (Classifier, FinetuneConfig, ResumeFile, classification_top1, finetune,
                            video_probabilities)
from eval_fakes import FakeEvalLoader, FakePretrainLoader, TinyEncoder, make_videos


class MeanLogits(nn.Module):
    """logits [N, 2] = (w * mean(x), -w * mean(x)): every crop/window gets its own softmax."""

    def __init__(self, weight=3.0):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        m = self.weight * x.mean((1, 2, 3, 4))
        return torch.stack([m, -m], 1)


def test_ten_crop_softmax_is_averaged_over_windows_and_crops():
    loader = FakeEvalLoader(make_videos(num_classes=2, per_class=2), crops="ten", noise=2.0, batch_size=2)
    got = video_probabilities(MeanLogits(), loader)
    assert got.shape == (4, 2)
    for index in range(4):
        probs = [MeanLogits()(loader.clip(i, s)).softmax(1) for i, s in loader.windows() if i == index]
        assert probs[0].shape == (10, 2) and len(probs) > 1
        assert torch.allclose(got[index], torch.cat(probs).mean(0), atol=1e-6)
    # averaging probabilities is not averaging logits: the difference is visible with noisy crops
    logits_first = [MeanLogits()(loader.clip(i, s)).mean(0) for i, s in loader.windows() if i == 0]
    assert not torch.allclose(got[0], torch.stack(logits_first).mean(0).softmax(0), atol=1e-4)


def test_two_stream_averages_probabilities(monkeypatch):
    videos = make_videos(num_classes=2, per_class=2)
    labels = torch.tensor([v.label for v in videos])  # [0, 0, 1, 1]
    rgb = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.6, 0.4]])  # right on videos 0, 2
    flow = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])  # right on 0, 1, 3
    fake = {"rgb": rgb, "flow": flow}
    monkeypatch.setattr("cvtcl.finetune.video_probabilities", lambda model, loader, **kw: fake[kw["modality"]])
    loaders = {m: FakeEvalLoader(videos, m) for m in ("rgb", "flow")}
    got = classification_top1({"rgb": nn.Identity(), "flow": nn.Identity()}, loaders)
    fused = ((rgb + flow) / 2).argmax(1)
    assert fused.tolist() == [0, 0, 0, 1]
    assert got == {"rgb": 50.0, "flow": 75.0, "two-stream": 75.0}
    assert got["two-stream"] == 100.0 * (fused == labels).float().mean().item()


def test_parameter_groups_use_head_and_backbone_rates():
    model = Classifier(TinyEncoder(), num_classes=4, dropout=0.9)
    groups = model.parameter_groups(lr_backbone=1e-4, lr_head=1e-3)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.fc.parameters()}
    assert model.dropout.p == 0.9
    with pytest.raises(ValueError, match="dropout"):
        FinetuneConfig(dropout=1.0)


def test_finetune_refuses_heldout_videos_in_training_and_learns():
    """A train loader that holds a held-out video, or whose steps are under 2 clips, is refused before
    any step; on the other videos the fine-tune learns, every step a full batch."""
    videos = make_videos(num_classes=3, per_class=8, groups_per_class=4)
    heldout = [v.name for v in videos if v.group.endswith("g00")]
    held_loader = FakeEvalLoader(videos, noise=0.3)
    config = FinetuneConfig(epochs=6, eval_every=2, dropout=0.2, lr_head=1e-2, lr_backbone=1e-2)
    fit = [v for v in videos if v.name not in heldout]
    for loader, refusal in ((FakePretrainLoader(videos, batch_size=6), "holds 6 held-out video"),
                            (FakePretrainLoader(fit, batch_size=1), "1 clip"),
                            (FakePretrainLoader(fit[:3], batch_size=4), "0 step")):
        with pytest.raises(ValueError, match=refusal):
            finetune(TinyEncoder(), 3, loader, held_loader, heldout, modality="rgb", config=config)
        assert not loader.seen
    train = FakePretrainLoader(fit, batch_size=6, noise=0.3)
    outcome = finetune(TinyEncoder(), 3, train, held_loader, heldout, modality="rgb", config=config)
    assert len(train.seen) == 6 * train.steps_per_epoch * 6 and train.steps_per_epoch == 3
    assert [e for e, _ in outcome.history] == [1, 3, 5]
    assert outcome.heldout_top1 == max(s for _, s in outcome.history)
    test_loader = FakeEvalLoader(make_videos(num_classes=3, per_class=3, prefix="te"), crops="ten", noise=0.3)
    test_loader.patterns = held_loader.patterns
    assert classification_top1({"rgb": outcome.model}, {"rgb": test_loader})["rgb"] > 60.0


def test_heldout_only_loader_gives_the_same_finetune(tmp_path):
    """Scoring on an EvalLoader of the held-out videos alone selects the same epoch, same weights."""
    from cvtcl.data import build_eval_loader
    from dali_pipelines.toy_shards import write_toy_dataset

    root = write_toy_dataset(tmp_path, num_videos=6, num_frames=12, height=16, width=20)
    kw = dict(frames_per_clip=4, window_stride=4, crop_size=8, batch_size=4, num_workers=0, num_threads=1)
    full = build_eval_loader(root, subset="train", **kw)
    heldout = [full.videos[3].name, full.videos[1].name]
    only = build_eval_loader(root, subset="train", videos=heldout, **kw)
    assert len(list(only)) < len(list(full))
    config = FinetuneConfig(epochs=4, eval_every=1, dropout=0.2, lr_head=1e-2, lr_backbone=1e-2)
    fit = [v for v in full.videos if v.name not in heldout]
    outcomes = [finetune(TinyEncoder(), 3, FakePretrainLoader(fit, batch_size=2), loader, heldout,
                         modality="rgb", config=config) for loader in (full, only)]
    assert outcomes[0].history == outcomes[1].history and outcomes[0].selected_epoch == outcomes[1].selected_epoch
    for a, b in zip(outcomes[0].model.state_dict().values(), outcomes[1].model.state_dict().values()):
        assert torch.equal(a, b)


class _Stop(Exception):
    pass


def _resume_case():
    videos = make_videos(num_classes=3, per_class=8, groups_per_class=4)
    heldout = [v.name for v in videos if v.group.endswith("g00")]
    config = FinetuneConfig(epochs=6, eval_every=2, dropout=0.5, lr_head=1e-2, lr_backbone=1e-2)

    def run(resume=None, stop_after=None, lines=None):
        train = FakePretrainLoader([v for v in videos if v.name not in heldout], batch_size=6, noise=0.3)
        if stop_after is not None:  # a kill during the epoch after `stop_after` (its state is not saved)
            epoch = train.epoch
            train.epoch = lambda e, *a: (_ for _ in ()).throw(_Stop()) if e == stop_after else epoch(e, *a)
        return finetune(TinyEncoder(), 3, train, FakeEvalLoader(videos, noise=0.3), heldout, modality="rgb",
                        config=config, resume=resume, log=None if lines is None else lines.append)

    return run, {"settings": 1}


def test_an_interrupted_finetune_resumes_to_the_uninterrupted_result(tmp_path):
    """Dropout draws, Adam's moments, the lr schedule and the best held-out weights all continue:
    killed in epoch 4 and rerun, the result is bitwise the uninterrupted one."""
    run, fingerprint = _resume_case()
    whole = run()
    resume = ResumeFile(tmp_path / "ft.resume.pt", fingerprint)
    with pytest.raises(_Stop):
        run(resume, stop_after=3)
    assert torch.load(resume.path, weights_only=True)["epoch"] == 3
    lines = []
    resumed = run(resume, lines=lines)
    assert lines[0].startswith("fine-tune rgb: resumed after epoch 3 of 6 from")
    assert [line.split(",")[0] for line in lines[1:]] == [f"fine-tune rgb: epoch {e}/6" for e in (4, 5, 6)]
    assert "held-out top-1" in lines[1] and "held-out top-1" not in lines[2]  # scored every 2nd epoch
    assert resumed.history == whole.history and resumed.selected_epoch == whole.selected_epoch
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished file gives the selected model without training again
    again = run(resume, lines=(lines := []))
    assert len(lines) == 1 and torch.equal(again.model.fc.weight, whole.model.fc.weight)


def test_a_resume_file_of_other_settings_or_damaged_starts_over(tmp_path):
    run, fingerprint = _resume_case()
    with pytest.raises(_Stop):
        run(ResumeFile(tmp_path / "ft.resume.pt", fingerprint), stop_after=2)
    lines = []
    run(ResumeFile(tmp_path / "ft.resume.pt", {"settings": 2}), lines=lines)
    assert "was made with other settings: fine-tuning from the start" in lines[0]
    assert lines[1].startswith("fine-tune rgb: epoch 1/6")
    (tmp_path / "ft.resume.pt").write_bytes(b"torn")
    lines = []
    run(ResumeFile(tmp_path / "ft.resume.pt", fingerprint), lines=lines)
    assert "cannot be loaded" in lines[0] and lines[1].startswith("fine-tune rgb: epoch 1/6")


def test_dropout_acts_in_training_only():
    """Dropout before the classifier draws a new mask every training forward and is the identity in
    eval mode (held-out and test scoring must be deterministic)."""
    model = Classifier(TinyEncoder(), num_classes=3, dropout=0.5)
    clips = torch.randn(4, 3, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    model.train()
    assert not torch.allclose(model(clips), model(clips))  # batch-norm statistics alike: only dropout differs
    model.eval()
    logits = model(clips)
    assert torch.equal(logits, model(clips))
    assert torch.allclose(logits, model.fc(model.encoder.features(clips)))


def _small_case():
    """8 videos of 2 classes; group g00 of each class (4 videos) held out, 4 fit, 2 steps an epoch."""
    videos = make_videos(num_classes=2, per_class=4, groups_per_class=2)
    heldout = [v.name for v in videos if v.group.endswith("g00")]
    train = FakePretrainLoader([v for v in videos if v.name not in heldout], batch_size=2, noise=0.3)
    return videos, heldout, train, FakeEvalLoader(videos, noise=0.3)


def test_heldout_score_counts_every_heldout_video_and_only_those(monkeypatch):
    """The held-out loader lists all 8 videos: right on 3 of the 4 held-out ones and wrong on the
    rest, the score is 75 (any subset of the held-out videos, or the fit videos, give another)."""
    videos, heldout, train, held_loader = _small_case()
    probs = torch.tensor([[0.1, 0.9] if v.label == 0 else [0.9, 0.1] for v in videos])  # all wrong
    right = [i for i, v in enumerate(videos) if v.name in heldout][:3]
    probs[right] = probs[right].flip(1)
    monkeypatch.setattr("cvtcl.finetune.video_probabilities", lambda *a, **kw: probs)
    outcome = finetune(TinyEncoder(), 2, train, held_loader, heldout, modality="rgb",
                       config=FinetuneConfig(epochs=1, eval_every=1, dropout=0.2))
    assert len(heldout) == 4 and outcome.history == [(0, 75.0)] and outcome.heldout_top1 == 75.0


def test_selected_epoch_weights_are_restored(monkeypatch):
    """Held-out scores 30, 90, 60: the returned model holds the weights scored after epoch 2, not
    the last epoch's (the test split is scored with what `finetune` returns)."""
    videos, heldout, train, held_loader = _small_case()
    scores, scored_weights = iter([30.0, 90.0, 60.0]), []
    real = video_probabilities

    def recording(model, loader, **kw):
        scored_weights.append(model.fc.weight.detach().clone())
        return real(model, loader, **kw)

    monkeypatch.setattr("cvtcl.finetune.video_probabilities", recording)
    monkeypatch.setattr("cvtcl.finetune.top1", lambda probs, labels: next(scores))
    config = FinetuneConfig(epochs=3, eval_every=1, dropout=0.2, lr_head=1e-2, lr_backbone=1e-2)
    outcome = finetune(TinyEncoder(), 2, train, held_loader, heldout, modality="rgb", config=config)
    assert outcome.selected_epoch == 1 and outcome.heldout_top1 == 90.0
    assert torch.equal(outcome.model.fc.weight, scored_weights[1])
    assert not torch.equal(scored_weights[1], scored_weights[2])  # the last epoch did move the weights


class _RecordLr(ResumeFile):
    """A resume file that keeps each epoch's saved learning rates instead of writing them."""

    def __init__(self):
        super().__init__(Path("/nonexistent/ft.resume.pt"), {})
        self.lrs = []

    def save(self, state):
        self.lrs.append([group["lr"] for group in state["optimizer"]["param_groups"]])


def test_lr_drops_tenfold_at_each_fraction_of_the_epochs():
    """lr_drops (0.8, 0.9) of 10 epochs: epochs 1-8 at the base rates, epoch 9 at a tenth, epoch 10
    at a hundredth, for the backbone and the head alike."""
    videos, heldout, train, held_loader = _small_case()
    record = _RecordLr()
    config = FinetuneConfig(epochs=10, eval_every=10, dropout=0.2, lr_head=1e-3, lr_backbone=1e-4)
    finetune(TinyEncoder(), 2, train, held_loader, heldout, modality="rgb", config=config, resume=record)
    used = [[1e-4, 1e-3]] + record.lrs[:-1]  # saved after the schedule's step: the next epoch's rates
    expected = [[1e-4 * f, 1e-3 * f] for f in [1.0] * 8 + [0.1, 0.01]]
    assert used == [pytest.approx(e, rel=1e-9) for e in expected]
