"""How well a frozen sampler would mine positives: class precision of its top-K neighbours vs chance.

Stage 2 (ALGORITHM.md; paper §2.2) trusts the sampler's top-K queue entries to share the query's
class. This measures that trust offline, on every video of a split instead of one queue: each
video is the mean of its sliding-window sampler embeddings (centre crop, no augmentation, the
same head output the trainer mines with); each video mines its top-K among the other videos,
excluding its own source group, with the trainer's functions (cvtcl/mining.py). Labels are used
for the number only. A randomly initialised encoder of the same architecture is the second
baseline (besides chance): what mining gets without any training.

    python benchmarks/mining_quality.py --data data/synthetic runs/smoke-cvtcl/stage1-flow/checkpoint-*.pt
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from cvtcl.checkpoint import load_encoder
from cvtcl.data import build_eval_loader
from cvtcl.mining import chance_precision, mine_topk, mining_precision, source_mask
from cvtcl.models import Encoder


@torch.no_grad()
def video_embeddings(encoder: Encoder, root: str, subset: str, frames: int, crop: int, backend: str,
                     features: bool = False):
    """-> (embeddings [N, D] unit norm, labels [N], groups [N]) for every video of the subset;
    `features`: the pooled backbone features instead of the head's embedding."""
    loader = build_eval_loader(root, subset=subset, modality=encoder.modality, frames_per_clip=frames,
                               window_stride=max(1, frames // 2), crop_size=crop, batch_size=8,
                               backend=backend, num_threads=1)
    embed = encoder.features if features else encoder
    sums = torch.zeros(len(loader.videos), encoder.feature_dim if features else encoder.embed_dim)
    counts = torch.zeros(len(loader.videos))
    for batch in loader:
        clips = batch[encoder.modality][:, 0]  # [B, C, T, H, W]: the centre crop
        sums.index_add_(0, batch["video_index"], embed(clips.float()))
        counts.index_add_(0, batch["video_index"], torch.ones(len(clips)))
    group_ids = {g: i for i, g in enumerate(sorted({v.group for v in loader.videos}))}
    labels = torch.tensor([v.label for v in loader.videos])
    groups = torch.tensor([group_ids[v.group] for v in loader.videos])
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=1), labels, groups


def mine(embeddings: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, topk: int) -> dict[str, float]:
    videos = torch.arange(len(labels))
    exclude = source_mask(videos, groups, videos, groups)  # itself and its source group
    mined = mine_topk(embeddings, embeddings, exclude, topk)
    return {"precision": float(mining_precision(mined, labels, labels)),
            "chance": float(chance_precision(labels, labels, exclude))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="sampler checkpoints (their query encoder is used)")
    parser.add_argument("--data", required=True, help="dataset directory (manifest.json + shards)")
    parser.add_argument("--subset", default="train", help="split-1 subset to mine in (stage 2 trains on train)")
    parser.add_argument("--frames", type=int, default=16, help="frames per window")
    parser.add_argument("--crop", type=int, default=32, help="centre-crop size the encoder sees")
    parser.add_argument("--topk", type=int, default=5, help="positives mined per video (paper: 5)")
    parser.add_argument("--features", action="store_true", help="mine with backbone features, not the head")
    parser.add_argument("--backend", default="dali", choices=("dali", "baseline"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for path in args.checkpoints:
        trained, _ = load_encoder(path)
        torch.manual_seed(0)
        untrained = Encoder(**trained.config()).eval()
        for name, encoder in ((path, trained), ("untrained " + trained.modality, untrained)):
            result = mine(*video_embeddings(encoder, args.data, args.subset, args.frames, args.crop, args.backend,
                                           args.features),
                          args.topk)
            rows.append({"sampler": name, "modality": encoder.modality, **result})
    print(f"{'sampler':<70} {'precision':>9} {'chance':>7}")
    for row in rows:
        print(f"{row['sampler'][-70:]:<70} {row['precision']:9.3f} {row['chance']:7.3f}")
    print(json.dumps({"benchmark": "mining_quality", "device": f"cpu ({platform.processor() or platform.machine()})",
                      "torch": torch.__version__, "topk": args.topk, "subset": args.subset, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
