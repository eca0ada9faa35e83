"""Video features are the mean over every window and crop; batch-norm modes leave the model alone."""

import pytest
import torch

from cvtcl.features import VideoAverager, average_over_windows, extract_features, inference_mode
from eval_fakes import FakeEvalLoader, TinyEncoder, make_videos


def test_features_are_window_means():
    loader = FakeEvalLoader(make_videos(num_classes=2, per_class=3), frames_per_clip=8, window_stride=4)
    encoder = TinyEncoder().eval()
    got = extract_features(encoder, loader, modality="rgb")
    assert got.features.shape == (6, encoder.feature_dim)
    assert got.labels.tolist() == [v.label for v in loader.videos]
    per_video = {}
    with torch.no_grad():
        for index, start in loader.windows():
            per_video.setdefault(index, []).append(encoder.features(loader.clip(index, start)).mean(0))
    assert len(per_video[5]) > 1  # several windows, so the mean is tested
    for index, rows in per_video.items():
        assert torch.allclose(got.features[index], torch.stack(rows).mean(0), atol=1e-6)


def test_ten_crop_features_average_crops():
    loader = FakeEvalLoader(make_videos(num_classes=1, per_class=2), crops="ten")
    encoder = TinyEncoder().eval()
    got = extract_features(encoder, loader)
    with torch.no_grad():
        rows = [encoder.features(loader.clip(i, s)) for i, s in loader.windows() if i == 0]  # [10, F] each
    assert torch.allclose(got.features[0], torch.cat(rows).mean(0), atol=1e-6)


def test_batch_mode_uses_batch_statistics_on_a_copy():
    loader = FakeEvalLoader(make_videos(num_classes=2, per_class=3), batch_size=4)
    encoder = TinyEncoder()
    encoder.train()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    eval_feats = extract_features(encoder, loader, bn_mode="eval").features
    batch_feats = extract_features(encoder, loader, bn_mode="batch").features
    assert not torch.allclose(eval_feats, batch_feats)
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    assert encoder.training
    with pytest.raises(ValueError, match="bn_mode"):
        with inference_mode(encoder, "frozen"):
            pass


def test_video_without_window_is_an_error():
    loader = FakeEvalLoader(make_videos(num_classes=1, per_class=3))
    all_windows = loader.windows
    loader.windows = lambda: ((i, s) for i, s in all_windows() if i != 1)  # video 1 never yielded
    with pytest.raises(RuntimeError, match="got no window"):
        average_over_windows(lambda x: x.mean((1, 2, 3, 4))[:, None], loader)


def test_averager_counts_repeats():
    averager = VideoAverager(2, 1)
    averager.add(torch.tensor([0, 0, 1]), torch.tensor([[1.0], [3.0], [5.0]]))
    assert averager.mean().flatten().tolist() == [2.0, 5.0]


def test_long_passes_report_progress():
    """A line per `every` seconds (here every batch) with the count and the total where the loader
    has one, and a last line with the videos and the time; nothing at all without `log`."""
    from cvtcl.features import reporting

    class Loader(list):
        videos = ["a", "b", "c"]

    batches, lines = Loader([{"i": 0}, {"i": 1}]), []
    assert list(reporting(batches, "features rgb train", lines.append, every=0.0)) == list(batches)
    assert [line.split(",")[0] for line in lines[:2]] == ["features rgb train: batch 1 of 2",
                                                        "features rgb train: batch 2 of 2"]
    assert lines[2].startswith("features rgb train: 3 videos in ") and len(lines) == 3
    unsized, lines = iter(batches), []
    unsized_loader = type("L", (), {"__iter__": lambda self: unsized, "videos": ["a"]})()
    list(reporting(unsized_loader, "x", lines.append, every=0.0))
    assert lines[0].startswith("x: batch 1, ") and lines[-1].startswith("x: 1 video in ")
    assert list(reporting(batches, "x", None)) == list(batches)


def test_rows_held_back_give_the_same_means_bitwise():
    """Rows computed on a GPU are copied to the host every few batches, not every batch: the sums
    are the same float64 additions in the same order, so the means are the same bits."""
    torch.manual_seed(0)
    batches = [(torch.randint(0, 5, (4,)), torch.randn(4, 3)) for _ in range(7)]
    batches.append((torch.arange(5), torch.randn(5, 3)))  # every video gets a window
    every_batch, held = VideoAverager(5, 3), VideoAverager(5, 3, flush_every=3)
    for index, values in batches[:2]:
        held.add(index, values)
    assert not held.counts.any() and len(held.pending) == 2  # nothing copied yet
    for index, values in batches[2:]:
        held.add(index, values)
    for index, values in batches:
        every_batch.add(index, values)
    assert torch.equal(every_batch.mean(), held.mean()) and not held.pending
