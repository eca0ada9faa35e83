"""Recall@k, centred cosine, two-stream fusion and the kNN monitor against plain references."""

import sys
import types

import numpy as np
import pytest
import torch

from cvtcl.features import VideoFeatures
from cvtcl.retrieval import (
    centred_cosine,
    evaluate_retrieval,
    KnnMonitor,
    knn_monitor,
    recall_at_k,
    retrieval_similarity,
    top_neighbours,
)
from eval_fakes import FakeEvalLoader, TinyEncoder, make_videos


def brute_force_recall(query, gallery, q_labels, g_labels, k):
    """Loop over queries: centre, normalise, sort the gallery, look for the class in the first k."""
    q = query.numpy().astype(np.float64)
    g = gallery.numpy().astype(np.float64)
    q, g = q - q.mean(0), g - g.mean(0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    hits = 0
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: -float(q[i] @ g[j]))
        hits += any(g_labels[j] == q_labels[i] for j in order[:k])
    return 100.0 * hits / len(q)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force(seed):
    rng = torch.Generator().manual_seed(seed)
    query, gallery = torch.randn(40, 12, generator=rng) + 3.0, torch.randn(70, 12, generator=rng) - 1.0
    q_labels, g_labels = torch.randint(0, 9, (40,), generator=rng), torch.randint(0, 9, (70,), generator=rng)
    got = recall_at_k(centred_cosine(query, gallery), q_labels, g_labels, ks=(1, 5, 10, 20, 50))
    for k in (1, 5, 10, 20, 50):
        assert got[f"R@{k}"] == pytest.approx(brute_force_recall(query, gallery, q_labels, g_labels, k))
    assert got["R@1"] <= got["R@5"] <= got["R@50"]


def test_recall_with_k_beyond_gallery_counts_whole_gallery():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    got = recall_at_k(sim, torch.tensor([2, 7]), torch.tensor([0, 1, 2]), ks=(1, 2, 50))
    assert got == {"R@1": 0.0, "R@2": 50.0, "R@50": 50.0}


def test_centring_matters():
    """Features sharing a large common offset: without centring every cosine is ~1."""
    base = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    query = base + torch.tensor([100.0, 100.0])
    gallery = base.flip(0) + torch.tensor([-50.0, 80.0])
    sim = centred_cosine(query, gallery)
    assert top_neighbours(sim, 1).flatten().tolist() == [1, 0]
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 0] == pytest.approx(-1.0)


def _features(rows, labels):
    videos = make_videos(num_classes=1, per_class=len(rows))
    return VideoFeatures(torch.tensor(rows, dtype=torch.float32), torch.tensor(labels), videos)


def test_two_stream_sums_similarities_and_can_beat_both_streams():
    # Every set is already mean-zero, so centring changes nothing. Gallery: class 0 = e1, class
    # 1 = -e1. Each stream is confidently right on two queries and slightly wrong on the other two,
    # the other stream confidently right there: the sum retrieves all four.
    gallery = _features([[1.0, 0.0], [-1.0, 0.0]], [0, 1])
    sure, weak = [[1.0, 0.0], [-1.0, 0.0]], [[-0.2, 1.0], [0.2, -1.0]]
    rgb = _features(sure + weak, [0, 1, 0, 1])
    flow = _features(weak + sure, [0, 1, 0, 1])
    query, galleries = {"rgb": rgb, "flow": flow}, {"rgb": gallery, "flow": gallery}
    sims = retrieval_similarity(query, galleries)
    assert torch.allclose(sims["two-stream"], sims["rgb"] + sims["flow"])
    results, tops = evaluate_retrieval(query, galleries, ks=(1,))
    assert results == {"rgb": {"R@1": 50.0}, "flow": {"R@1": 50.0}, "two-stream": {"R@1": 100.0}}
    assert tops["two-stream"][:, 0].tolist() == [0, 1, 0, 1]  # top-3 clipped to the 2-video gallery


def test_two_stream_refuses_misaligned_videos():
    a = _features([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    b = VideoFeatures(a.features, a.labels, list(reversed(a.videos)))
    with pytest.raises(ValueError, match="different videos"):
        retrieval_similarity({"rgb": a, "flow": b}, {"rgb": a, "flow": a})


def test_knn_monitor_returns_metrics_and_restores_training_mode():
    encoder = TinyEncoder()
    encoder.train()
    train = FakeEvalLoader(make_videos(prefix="train"), seed=0)
    test = FakeEvalLoader(make_videos(per_class=3, prefix="test"), seed=1)
    test.patterns = train.patterns  # same classes look the same in both sets
    running = encoder.backbone[1].running_mean.clone()
    metrics = knn_monitor(encoder, train, test)
    assert set(metrics) == {"knn/R@1", "knn/R@5", "knn/R@10"}
    assert metrics["knn/R@1"] == 100.0  # clean class patterns: the random net separates them
    assert encoder.training
    assert torch.equal(encoder.backbone[1].running_mean, running)


def test_knn_monitor_object_builds_loaders_once():
    built = []

    def make_loader(subset):
        built.append(subset)
        loader = FakeEvalLoader(make_videos(per_class=3 if subset == "test" else 6, prefix=subset), seed=0)
        return loader

    monitor = KnnMonitor(make_loader, "rgb", ks=(1, 5))
    first, second = monitor(TinyEncoder()), monitor(TinyEncoder())
    assert built == ["train", "test"]
    assert first == second and set(first) == {"knn/R@1", "knn/R@5"}


def test_knn_monitor_from_dataset_builds_centre_crop_eval_loaders(monkeypatch):
    calls = []

    def build_eval_loader(root, **kwargs):
        calls.append(kwargs)
        return FakeEvalLoader(make_videos(prefix=kwargs["subset"]), kwargs["modality"])

    monkeypatch.setitem(sys.modules, "cvtcl.data", types.SimpleNamespace(build_eval_loader=build_eval_loader))
    monitor = KnnMonitor.from_dataset("data/x", "flow", window_stride=32, device="cpu", crop_size=64)
    assert set(monitor(TinyEncoder("flow"))) == {"knn/R@1", "knn/R@5", "knn/R@10"}
    assert [c["subset"] for c in calls] == ["train", "test"]
    assert all(c["crops"] == "center" and c["window_stride"] == 32 and c["crop_size"] == 64 for c in calls)
    assert calls[0]["device"] == "cpu" and calls[0]["device_id"] is None


def test_two_stream_is_blind_to_one_stream_feature_scale():
    """Each set is L2-normalised, so multiplying a stream's features (queries and gallery) by 100
    changes neither its cosines nor its weight in the two-stream sum: the case above still
    retrieves all four queries rather than following the scaled stream alone."""
    gallery = _features([[1.0, 0.0], [-1.0, 0.0]], [0, 1])
    sure, weak = [[1.0, 0.0], [-1.0, 0.0]], [[-0.2, 1.0], [0.2, -1.0]]
    rgb = _features(sure + weak, [0, 1, 0, 1])
    flow = _features(weak + sure, [0, 1, 0, 1])
    loud_rgb = VideoFeatures(100 * rgb.features, rgb.labels, rgb.videos)
    loud_gallery = VideoFeatures(100 * gallery.features, gallery.labels, gallery.videos)
    plain = retrieval_similarity({"rgb": rgb, "flow": flow}, {"rgb": gallery, "flow": gallery})
    loud = retrieval_similarity({"rgb": loud_rgb, "flow": flow}, {"rgb": loud_gallery, "flow": gallery})
    assert torch.allclose(loud["two-stream"], plain["two-stream"], atol=1e-6)
    assert loud["rgb"].abs().max() <= 1.0 + 1e-6
    results, _ = evaluate_retrieval({"rgb": loud_rgb, "flow": flow}, {"rgb": loud_gallery, "flow": gallery}, ks=(1,))
    assert results["two-stream"] == {"R@1": 100.0}


def test_knn_monitor_queries_test_videos_against_the_train_gallery(monkeypatch):
    """Fig. 3's monitor ranks the train videos for each test video. Here the two test videos find
    their class first (R@1 100), while the train videos 2 and 3, used as queries, would find the
    other class first (R@1 50): swapping the roles changes the number."""
    test = _features([[1.0, 0.0], [-1.0, 0.0]], [0, 1])
    train = _features([[1.0, 0.0], [-1.0, 0.0], [0.1, 1.0], [-0.1, -1.0]], [0, 1, 1, 0])
    by_loader = {"test loader": test, "train loader": train}
    monkeypatch.setattr("cvtcl.retrieval.extract_features", lambda encoder, loader, **kw: by_loader[loader])
    swapped = recall_at_k(centred_cosine(train.features, test.features), train.labels, test.labels, ks=(1,))
    assert swapped == {"R@1": 50.0}
    assert knn_monitor(TinyEncoder(), "train loader", "test loader", ks=(1,)) == {"knn/R@1": 100.0}
