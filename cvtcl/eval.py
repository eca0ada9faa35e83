"""`python -m cvtcl.eval retrieval | linear | finetune`: the paper's three evaluations (§3.2).

    python -m cvtcl.eval retrieval --checkpoint RUN/rgb.pt --checkpoint-flow RUN/flow.pt \\
        --dataset ucf101 --shards data/ucf101 --split 1

`--checkpoint` may hold either modality; with `--checkpoint-flow` the first must be RGB and the
results add the two-stream row. `--random-init rgb|flow` evaluates an untrained encoder instead
(the baseline every table needs; `--bn-mode batch` normalises with batch statistics).

The `run_*` functions take encoders and a loader factory, so the demo, the trainer's monitor and
the tests call them with model objects directly; the CLI only loads checkpoints and builds DALI
loaders (`cvtcl.data.build_eval_loader`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvtcl import report
from cvtcl.features import VideoFeatures, extract_features
from cvtcl.finetune import FinetuneConfig, classification_top1, finetune
from cvtcl.linear_probe import LinearProbeConfig, linear_probe
from cvtcl.retrieval import RECALL_KS, evaluate_retrieval
from cvtcl.selection import heldout_split

# (subset "train" | "test", modality, crops "center" | "ten"[, videos=names]) -> EvalLoader;
# `videos=` (used by the fine-tune only) restricts the loader to those videos, in that order.
LoaderFactory = Callable[..., Any]


def split_features(
    encoders: dict[str, nn.Module], make_loader: LoaderFactory, *, device: str = "cpu", bn_mode: str = "eval"
) -> tuple[dict[str, VideoFeatures], dict[str, VideoFeatures]]:
    """Centre-crop video features of the train and the test subset, per modality."""
    train, test = {}, {}
    for modality, encoder in encoders.items():
        encoder.to(device)
        train[modality] = extract_features(encoder, make_loader("train", modality, "center"),
                                           modality=modality, device=device, bn_mode=bn_mode)
        test[modality] = extract_features(encoder, make_loader("test", modality, "center"),
                                          modality=modality, device=device, bn_mode=bn_mode)
    return train, test


def run_retrieval(
    train: dict[str, VideoFeatures], test: dict[str, VideoFeatures], ks: Sequence[int] = RECALL_KS
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Test videos query the train gallery: {stream: {"R@k": %}} and {stream: top-3 [Q, 3]}."""
    return evaluate_retrieval(test, train, ks)


def run_linear(
    train: dict[str, VideoFeatures],
    test: dict[str, VideoFeatures],
    num_classes: int,
    config: LinearProbeConfig | None = None,
    heldout_fraction: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Linear probe per stream (+ two-stream), the epoch selected on held-out train groups."""
    config = config or LinearProbeConfig()
    fit, held = heldout_split(next(iter(train.values())).videos, heldout_fraction, config.seed)
    return linear_probe(train, test, fit, held, num_classes, config)


def run_finetune(
    encoders: dict[str, nn.Module],
    make_loader: LoaderFactory,
    make_train_loader: Callable[[str], Any],
    num_classes: int,
    *,
    device: str = "cpu",
    config: FinetuneConfig | None = None,
    heldout_fraction: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Fine-tune each encoder (in place), then score ten-crop test top-1 per stream (+ two-stream)."""
    config = config or FinetuneConfig()
    models, info = {}, {}
    for modality, encoder in encoders.items():
        train_loader = make_train_loader(modality)
        _, held = heldout_split(train_loader.videos, heldout_fraction, config.seed)
        held_names = [train_loader.videos[i].name for i in held]
        # only the held-out videos are decoded for scoring, not the whole train subset
        heldout_loader = make_loader("train", modality, "center", videos=held_names)
        outcome = finetune(encoder, num_classes, train_loader, heldout_loader, held_names,
                           modality=modality, device=device, config=config)
        models[modality] = outcome.model
        info[modality] = {"heldout_top1": outcome.heldout_top1, "epoch": outcome.selected_epoch}
    test_loaders = {m: make_loader("test", m, "ten") for m in models}
    top1 = classification_top1(models, test_loaders, device=device)
    return {stream: {"top1": value, **info.get(stream, {})} for stream, value in top1.items()}


# ---------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvtcl.eval", description=__doc__.split("\n")[0])
    parser.add_argument("protocol", choices=("retrieval", "linear", "finetune"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="encoder checkpoint (cvtcl.checkpoint); RGB when --checkpoint-flow is given")
    source.add_argument("--random-init", choices=("rgb", "flow"), help="evaluate an untrained encoder instead")
    parser.add_argument("--checkpoint-flow", help="flow checkpoint for two-stream evaluation")
    parser.add_argument("--backbone", default="s3d", choices=("s3d", "tiny"), help="with --random-init")
    parser.add_argument("--bn-mode", default="eval", choices=("eval", "batch"),
                        help="feature extraction: running (eval) or batch statistics")
    parser.add_argument("--dataset", required=True, choices=("ucf101", "hmdb51", "kinetics400", "synthetic"),
                        help="kinetics400: split 1 = train.csv / validate.csv (preprocess/kinetics.py)")
    parser.add_argument("--shards", required=True, help="preprocessed dataset directory (manifest.json)")
    parser.add_argument("--split", default="1")
    parser.add_argument("--out", help="where the JSON results go (default: the checkpoint's directory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="dali", choices=("dali", "baseline"),
                        help="dali pipelines, or the PyTorch/OpenCV baseline loader")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--frames-per-clip", type=int, default=32)
    parser.add_argument("--window-stride", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, help="linear probe / fine-tune epochs (defaults: 100 / 500)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_encoders(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """{modality: encoder} and {modality: where it came from} from the CLI's checkpoint options."""
    if args.random_init:
        from cvtcl.models import Encoder

        torch.manual_seed(args.seed)
        return {args.random_init: Encoder(args.random_init, args.backbone)}, {args.random_init: "random-init"}
    try:
        from cvtcl.checkpoint import load_encoder
    except ImportError as err:
        raise SystemExit(f"cannot load checkpoints: {err}; install cvtcl with its trainer (pip install -e .)") from None
    encoders, sources = {}, {}
    for path in filter(None, (args.checkpoint, args.checkpoint_flow)):
        encoder, _ = load_encoder(path, map_location="cpu")
        modality = getattr(encoder, "modality", None)
        if modality in encoders:
            raise SystemExit(f"{path}: a second {modality} encoder; --checkpoint-flow must be a flow checkpoint")
        encoders[modality], sources[modality] = encoder, str(path)
    if args.checkpoint_flow and set(encoders) != {"rgb", "flow"}:
        raise SystemExit(f"two-stream needs an RGB --checkpoint and a flow --checkpoint-flow, got {sources}")
    return encoders, sources


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    from cvtcl.data import build_eval_loader, build_pretrain_loader
    from preprocess.schema import load_manifest

    manifest = load_manifest(args.shards)
    if manifest.dataset != args.dataset:
        raise SystemExit(f"{args.shards}/manifest.json holds dataset {manifest.dataset!r}, not {args.dataset!r}")
    encoders, sources = load_encoders(args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    common = dict(split=args.split, frames_per_clip=args.frames_per_clip, crop_size=args.crop_size,
                  device="cuda" if on_gpu else "cpu", device_id=(device.index or 0) if on_gpu else None,
                  num_threads=args.num_threads, backend=args.backend)

    def make_loader(subset: str, modality: str, crops: str, videos: Sequence[str] | None = None) -> Any:
        return build_eval_loader(args.shards, subset=subset, modality=modality, crops=crops, videos=videos,
                                 window_stride=args.window_stride, batch_size=args.batch_size, **common)

    def make_train(modality: str) -> Any:  # fine-tune: augmented clips of the train subset
        return build_pretrain_loader(args.shards, subset="train", modalities=(modality,), batch_size=args.batch_size,
                                     pair_mode="same", seed=args.seed, **common)

    out_dir = Path(args.out or Path(args.checkpoint or ".").resolve().parent)
    payload: dict[str, Any] = {"protocol": args.protocol, "dataset": args.dataset, "split": args.split,
                               "shards": str(Path(args.shards).resolve()), "encoders": sources,
                               "bn_mode": args.bn_mode, "seed": args.seed}
    if args.protocol == "finetune":
        config = FinetuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
        results = run_finetune(encoders, make_loader, make_train, len(manifest.classes),
                               device=args.device, config=config, heldout_fraction=args.heldout_fraction)
    else:
        train, test = split_features(encoders, make_loader, device=args.device, bn_mode=args.bn_mode)
        if args.protocol == "retrieval":
            results, tops = run_retrieval(train, test)
            any_modality = next(iter(train))
            report.write_results(report.neighbours_path(out_dir, args.dataset, args.split),
                                 report.neighbours_payload(args.shards, manifest.classes,
                                                           test[any_modality], train[any_modality], tops))
        else:
            config = LinearProbeConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
            results = run_linear(train, test, len(manifest.classes), config, args.heldout_fraction)
    payload["results"] = results
    path = report.write_results(report.results_path(out_dir, args.protocol, args.dataset, args.split), payload)
    report.print_table(report.results_table(f"{args.protocol} on {args.dataset} split {args.split}", results))
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
