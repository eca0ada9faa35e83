"""How well a frozen sampler would mine positives: class precision of its top-K neighbours vs chance.

Stage 2 (docs/algorithm.md; paper §2.2) trusts the sampler's top-K queue entries to share the query's
class. This measures that trust offline, on every video of a split instead of one queue: each
video is the mean of its sliding-window sampler embeddings (centre crop, no augmentation, the
same head output the trainer mines with); each video mines its top-K among the other videos,
excluding its own source group, with the trainer's functions (cvtcl/mining.py). Labels are used
for the number only. A randomly initialised encoder of the same architecture is the second
baseline (besides chance): what mining gets without any training.

    python benchmarks/mining_quality.py --data data/synthetic runs/smoke-cvtcl/stage1-flow/checkpoint-*.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import ArgumentParser, header, positive_int, run_script, user_input  # noqa: E402
from cvtcl.checkpoint import load_encoder  # noqa: E402
from cvtcl.data import build_eval_loader  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402
from cvtcl.mining import chance_precision, mine_topk, mining_precision, source_mask  # noqa: E402
from cvtcl.models import Encoder  # noqa: E402


@torch.no_grad()
def video_embeddings(encoders: list[Encoder], loader, features: bool = False):
    """-> ([embeddings [N, D] unit norm, one per encoder], labels [N], groups [N]) for every video of
    the loader: the mean over its windows. One pass over the loader serves every encoder (in eval
    mode). `features`: the pooled backbone features instead of the head's embedding."""
    embeds = [encoder.features if features else encoder for encoder in encoders]
    dims = [encoder.feature_dim if features else encoder.embed_dim for encoder in encoders]
    # Summed in float32, not by cvtcl.features.average_over_windows (float64 sums): on the synthetic
    # data that last-bit difference changed which neighbours flow samplers mine, and their precision.
    sums = torch.zeros(len(loader.videos), sum(dims))
    counts = torch.zeros(len(loader.videos))
    for batch in loader:
        clips = batch[encoders[0].modality][:, 0].float()  # [B, C, T, H, W]: the centre crop
        sums.index_add_(0, batch["video_index"], torch.cat([embed(clips) for embed in embeds], dim=1))
        counts.index_add_(0, batch["video_index"], torch.ones(len(clips)))
    group_ids = {g: i for i, g in enumerate(sorted({v.group for v in loader.videos}))}
    labels = torch.tensor([v.label for v in loader.videos])
    groups = torch.tensor([group_ids[v.group] for v in loader.videos])
    means = sums / counts.clamp(min=1)[:, None]
    return [F.normalize(mean, dim=1) for mean in means.split(dims, dim=1)], labels, groups


def mine(embeddings: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, topk: int) -> dict[str, float]:
    videos = torch.arange(len(labels))
    exclude = source_mask(videos, groups, videos, groups)  # itself and its source group
    mined = mine_topk(embeddings, embeddings, exclude, topk)
    return {"precision": float(mining_precision(mined, labels, labels)),
            "chance": float(chance_precision(labels, labels, exclude))}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="sampler checkpoints (their query encoder is used)")
    parser.add_argument("--data", required=True, help="dataset directory (manifest.json + shards)")
    parser.add_argument("--subset", default="train", help="split-1 subset to mine in (stage 2 trains on train)")
    parser.add_argument("--frames", type=positive_int, default=16, help="frames per window")
    parser.add_argument("--crop", type=positive_int, default=32, help="centre-crop size the encoder sees")
    parser.add_argument("--topk", type=positive_int, default=5, help="positives mined per video (paper: 5)")
    parser.add_argument("--features", action="store_true", help="mine with backbone features, not the head")
    parser.add_argument("--backend", default="dali", choices=("dali", "baseline"))
    args = parser.parse_args(argv)
    from preprocess.schema import LayoutError, load_manifest

    with user_input(FileNotFoundError, LayoutError):  # each says what the path must hold
        subsets = load_manifest(args.data).splits.get("1", {})
        for path in args.checkpoints:
            if not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist; give a checkpoint-*.pt file from a run directory")
    if args.subset not in subsets:
        raise UsageError(f"--subset {args.subset}: split 1 of {args.data} has the subsets {', '.join(sorted(subsets))}")
    torch.set_num_threads(1)
    rows, loaders = [], {}  # one loader per modality
    for path in args.checkpoints:
        trained, _ = load_encoder(path)
        torch.manual_seed(0)
        untrained = Encoder(**trained.config()).eval()
        modality = trained.modality
        if modality not in loaders:
            loaders[modality] = build_eval_loader(
                args.data, subset=args.subset, modality=modality, frames_per_clip=args.frames,
                window_stride=max(1, args.frames // 2), crop_size=args.crop, batch_size=8, backend=args.backend,
                num_threads=1)
            if len({video.group for video in loaders[modality].videos}) < 2:  # precision would be NaN
                raise UsageError(f"--subset {args.subset} of {args.data}: every video comes from one source group, "
                                 "and mining skips a video's own group, so nothing can be mined; use a dataset "
                                 "with several groups")
        embeddings, labels, groups = video_embeddings([trained, untrained], loaders[modality], args.features)
        for name, encoder_embeddings in zip((path, "untrained " + modality), embeddings):
            rows.append({"sampler": name, "modality": modality, **mine(encoder_embeddings, labels, groups, args.topk)})
    print(f"{'sampler':<70} {'precision':>9} {'chance':>7}")
    for row in rows:
        print(f"{row['sampler'][-70:]:<70} {row['precision']:9.3f} {row['chance']:7.3f}")
    print(json.dumps({**header("mining_quality", "cpu"), "topk": args.topk, "subset": args.subset, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script("mining_quality.py", main))
