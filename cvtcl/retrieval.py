"""Nearest-neighbour video retrieval (paper §3.2, Table 5) and the kNN training monitor (Fig. 3).

Protocol (docs/algorithm.md "Evaluation"): queries are the test videos, the gallery is the train
videos of the same split; each set is mean-centred by its own mean, L2-normalised, and compared by
cosine similarity. A query is a hit at k when any of its k most similar gallery videos has its
class; Recall@k is the fraction of hit queries. Two-stream retrieval sums the RGB and flow
similarity matrices (both are cosines in [-1, 1], so neither stream dominates by scale).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cvtcl.features import VideoFeatures, extract_features

RECALL_KS = (1, 5, 10, 20, 50)


def too_few_to_centre(queries: int, gallery: int) -> str | None:
    """Why retrieval cannot rank with these set sizes, or None: each set is centred by its own
    mean, which turns a set of one video into zeros (every similarity 0, the ranking the gallery's
    order, R@k a function of it alone)."""
    small = [f"{count} {name} video" for name, count in (("test", queries), ("train", gallery)) if count < 2]
    if not small:
        return None
    return (f"{' and '.join(small)}: retrieval centres each set by its own mean, which leaves a single video's "
            "feature all zeros; it needs at least 2 test and 2 train videos")


def centred_cosine(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """query [Q, F], gallery [G, F] -> similarity [Q, G] after per-set mean-centring and L2 norm.

    Centring removes the component every feature shares (large for an untrained or collapsed
    network), which would otherwise make all cosines ~1 and retrieval a coin toss.
    """
    why = too_few_to_centre(len(query), len(gallery))
    if why is not None:
        raise ValueError(why)
    query = query.double() - query.double().mean(0, keepdim=True)
    gallery = gallery.double() - gallery.double().mean(0, keepdim=True)
    query = torch.nn.functional.normalize(query, dim=1)
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    return (query @ gallery.T).float()  # [Q, G]


def recall_at_k(
    similarity: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """{"R@k": percent of queries with a same-class video among their top-k gallery neighbours}.

    similarity [Q, G]; query_labels [Q]; gallery_labels [G]. k larger than G counts the whole
    gallery (reported under its requested name so tables keep their columns).
    """
    if similarity.shape != (len(query_labels), len(gallery_labels)):
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match "
                         f"{len(query_labels)} queries x {len(gallery_labels)} gallery videos")
    k_max = min(max(ks), similarity.shape[1])
    top = similarity.topk(k_max, dim=1).indices  # [Q, k_max], most similar first
    same = gallery_labels[top] == query_labels[:, None]  # [Q, k_max]
    hit_by_rank = same.cumsum(1) > 0  # [Q, k_max]: a hit within the first r + 1
    return {f"R@{k}": 100.0 * hit_by_rank[:, min(k, k_max) - 1].float().mean().item() for k in ks}


def top_neighbours(similarity: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Indices [Q, k] of each query's k most similar gallery videos, most similar first."""
    return similarity.topk(min(k, similarity.shape[1]), dim=1).indices


def retrieval_similarity(
    query: dict[str, VideoFeatures], gallery: dict[str, VideoFeatures]
) -> dict[str, torch.Tensor]:
    """Per modality and, with two streams, "two-stream" = sum of the modalities' similarities.

    query/gallery: {"rgb": VideoFeatures, "flow": VideoFeatures} (either or both), rows aligned
    across modalities (the same loader video order). Returns {name: [Q, G]}.
    """
    if set(query) != set(gallery):
        raise ValueError(f"query modalities {sorted(query)} != gallery modalities {sorted(gallery)}")
    sims = {m: centred_cosine(query[m].features, gallery[m].features) for m in sorted(query)}
    if len(sims) == 2:
        rgb, flow = query["rgb"], query["flow"]
        if rgb.names != flow.names or gallery["rgb"].names != gallery["flow"].names:
            raise ValueError("RGB and flow features list different videos; build both loaders "
                             "from the same dataset, split and subset")
        sims["two-stream"] = sims["rgb"] + sims["flow"]
    return sims


def evaluate_retrieval(
    query: dict[str, VideoFeatures],
    gallery: dict[str, VideoFeatures],
    ks: Sequence[int] = RECALL_KS,
    neighbours: int = 3,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Recall@k per stream, and each stream's top-`neighbours` gallery indices [Q, neighbours]."""
    any_modality = next(iter(query.values()))
    q_labels, g_labels = any_modality.labels, next(iter(gallery.values())).labels
    results, tops = {}, {}
    for name, sim in retrieval_similarity(query, gallery).items():
        results[name] = recall_at_k(sim, q_labels, g_labels, ks)
        tops[name] = top_neighbours(sim, neighbours)
    return results, tops


def knn_monitor(
    encoder: nn.Module,
    train_loader: Any,
    test_loader: Any,
    *,
    modality: str | None = None,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = "knn/",
) -> dict[str, float]:
    """The periodic retrieval check of Fig. 3, for the trainer to call every N epochs.

    Extracts centre-crop features of `test_loader` (queries) and `train_loader` (gallery) with the
    encoder in eval mode (its train/eval state is restored) and returns {"knn/R@1": ..., ...} ready
    for metrics.jsonl. Cost: one forward pass per window of both sets; give the monitor loaders
    over a subset or with a larger window stride when the full sets are too slow.
    """
    query = extract_features(encoder, test_loader, modality=modality, device=device)
    gallery = extract_features(encoder, train_loader, modality=modality, device=device)
    recalls = recall_at_k(centred_cosine(query.features, gallery.features), query.labels, gallery.labels, ks)
    return {prefix + key: value for key, value in recalls.items()}


class KnnMonitor:
    """`knn_monitor` with its two loaders built once, on first use: `monitor(encoder) -> metrics`.

    make_loader(subset) -> a centre-crop EvalLoader of that subset ("train" | "test") for the
    monitored modality; `from_dataset` builds it with `cvtcl.data.build_eval_loader`.
    """

    def __init__(self, make_loader: Callable[[str], Any], modality: str, *,
                 device: str | torch.device = "cpu", ks: Sequence[int] = (1, 5, 10)):
        self.make_loader, self.modality, self.device, self.ks = make_loader, modality, device, ks
        self.loaders: dict[str, Any] = {}

    @classmethod
    def from_dataset(cls, root: str, modality: str, *, split: str = "1", window_stride: int = 16,
                     device: str | torch.device = "cpu", **loader_options: Any) -> KnnMonitor:
        """Loaders from `build_eval_loader` on `device` (the encoder's device too); loader_options
        go there as well (frames_per_clip, crop_size, batch_size, backend, num_threads, ...).
        A larger `window_stride` makes the check cheaper."""
        device = torch.device(device)
        on_gpu = device.type == "cuda"

        def make_loader(subset: str) -> Any:
            from cvtcl.data import build_eval_loader  # the one module that imports DALI

            return build_eval_loader(root, split=split, subset=subset, modality=modality, crops="center",
                                     window_stride=window_stride, device="cuda" if on_gpu else "cpu",
                                     device_id=(device.index or 0) if on_gpu else None, **loader_options)

        return cls(make_loader, modality, device=device)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        for subset in ("train", "test"):
            if subset not in self.loaders:
                self.loaders[subset] = self.make_loader(subset)
        return knn_monitor(encoder, self.loaders["train"], self.loaders["test"], modality=self.modality,
                           device=self.device, ks=self.ks)
