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
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvtcl import distributed, provenance, report
from cvtcl.engine import PRECISION, memory_report
from cvtcl.errors import EXIT_OK, RunFailed, UsageError, brief, run_command
from cvtcl.features import VideoFeatures, extract_features
from cvtcl.finetune import FinetuneConfig, ResumeFile, classification_top1, finetune
from cvtcl.linear_probe import LinearProbeConfig, linear_probe
from cvtcl.preflight import check_backend
from cvtcl.retrieval import RECALL_KS, evaluate_retrieval, too_few_to_centre
from cvtcl.selection import heldout_split
from preprocess.hygiene import exclusive_dir, lock_holder, remove_temporaries

PROBE_LR = {"adam": 1e-3, "sgd": 0.1}  # linear probe: our default, and CoCLR's SGD setting

# (subset "train" | "test", modality, crops "center" | "ten"[, videos=names]) -> EvalLoader;
# `videos=` (used by the fine-tune only) restricts the loader to those videos, in that order.
LoaderFactory = Callable[..., Any]


def say(line: str) -> None:
    """A progress line of a long evaluation (features, fine-tune epochs), shown as it happens (by
    the first process under torchrun)."""
    if distributed.rank() == 0:
        print(line, flush=True)


def split_features(
    encoders: dict[str, nn.Module], make_loader: LoaderFactory, *, device: str = "cpu", bn_mode: str = "eval",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, VideoFeatures], dict[str, VideoFeatures]]:
    """Centre-crop video features of the train and the test subset, per modality (`log`: progress).
    Under torchrun each process encodes every world-th video and all get every row, in order."""
    features: dict[str, dict[str, VideoFeatures]] = {"train": {}, "test": {}}
    world, rank = distributed.world_size(), distributed.rank()
    for modality, encoder in encoders.items():
        encoder.to(device)
        for subset, out in features.items():
            whole = make_loader(subset, modality, "center")
            # a loader builds its pipeline when iterated: asking for its videos is free
            mine = whole.videos[rank::world]
            if not mine:  # more processes than videos: the last ones have none to encode
                out[modality] = gathered(None, whole.videos)
                continue
            loader = whole if world == 1 else make_loader(subset, modality, "center", videos=[v.name for v in mine])
            share = f" (process 1 of {world})" if world > 1 else ""  # only the first one prints
            part = extract_features(encoder, loader, modality=modality, device=device, bn_mode=bn_mode,
                                    label=f"features {modality} {subset}{share}", log=log)
            out[modality] = part if world == 1 else gathered(part, whole.videos)
    return features["train"], features["test"]


def gathered(part: VideoFeatures | None, videos: list) -> VideoFeatures:
    """Every process's features of its every-world-th videos, back in the subset's order (None:
    this process had no video)."""
    parts = distributed.gather_objects(None if part is None else part.features)  # CPU tensors, through gloo
    world, first = len(parts), parts[0]  # the first process always has a video
    rows = torch.empty(len(videos), first.shape[1], dtype=first.dtype)
    for rank, features in enumerate(parts):
        if features is not None:
            rows[rank::world] = features
    return VideoFeatures(rows, torch.tensor([v.label for v in videos], dtype=torch.int64), list(videos))


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
    make_train_loader: Callable[[str, Sequence[str]], Any],
    num_classes: int,
    *,
    device: str = "cpu",
    config: FinetuneConfig | None = None,
    heldout_fraction: float = 0.1,
    resume: dict[str, ResumeFile] | None = None,
) -> dict[str, dict[str, float]]:
    """Fine-tune each encoder (in place), then score ten-crop test top-1 per stream (+ two-stream).
    make_train_loader(modality, videos): augmented clips of those train videos (the fit part);
    `resume`: per modality, the file its fine-tune continues from and saves to after every epoch."""
    config = config or FinetuneConfig()
    models, info = {}, {}
    for modality, encoder in encoders.items():
        train = make_loader("train", modality, "center").videos  # a loader's videos cost no decoding
        fit, held = heldout_split(train, heldout_fraction, config.seed)
        held_names = [train[i].name for i in held]
        train_loader = make_train_loader(modality, [train[i].name for i in fit])
        # only the held-out videos are decoded for scoring, not the whole train subset
        heldout_loader = make_loader("train", modality, "center", videos=held_names)
        outcome = finetune(encoder, num_classes, train_loader, heldout_loader, held_names,
                           modality=modality, device=device, config=config,
                           resume=(resume or {}).get(modality), log=say)
        models[modality] = outcome.model
        # counted from 1, as in the per-epoch lines ("best ... after epoch N")
        info[modality] = {"heldout_top1": outcome.heldout_top1, "epoch": outcome.selected_epoch + 1}
    if distributed.rank() != 0:  # under torchrun the first process scores the test split alone
        return {}
    test_loaders = {m: make_loader("test", m, "ten") for m in models}
    top1 = classification_top1(models, test_loaders, device=device, log=say)
    return {stream: {"top1": value, **info.get(stream, {})} for stream, value in top1.items()}


# ---------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvtcl.eval", description=__doc__.split("\n")[0])
    parser.add_argument("protocol", choices=("retrieval", "linear", "finetune"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="encoder checkpoint (cvtcl.checkpoint); RGB when --checkpoint-flow is given")
    source.add_argument("--random-init", choices=("rgb", "flow"), help="evaluate an untrained encoder instead")
    parser.add_argument("--checkpoint-flow", help="flow checkpoint for two-stream evaluation")
    parser.add_argument("--backbone", default=None, choices=("s3d", "tiny"),
                        help="with --random-init (default s3d); a checkpoint names its own")
    parser.add_argument("--bn-mode", default="eval", choices=("eval", "batch"),
                        help="feature extraction: running (eval) or batch statistics")
    parser.add_argument("--dataset", required=True, choices=("ucf101", "hmdb51", "kinetics400", "synthetic"),
                        help="kinetics400: split 1 = train.csv / validate.csv (preprocess/kinetics.py)")
    parser.add_argument("--shards", required=True, help="preprocessed dataset directory (manifest.json)")
    parser.add_argument("--split", default="1")
    parser.add_argument("--out", help="where the JSON results go (default: the checkpoint's directory; with "
                                      "--random-init the current directory); existing results are never overwritten")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="dali", choices=("dali", "baseline"),
                        help="dali pipelines, or the PyTorch/OpenCV baseline loader")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--frames-per-clip", type=int, help="default: the checkpoint's data.frames_per_clip (32)")
    parser.add_argument("--window-stride", type=int, help="default: half of --frames-per-clip (16 for 32)")
    parser.add_argument("--crop-size", type=int, help="default: the checkpoint's data.crop_size (128)")
    parser.add_argument("--epochs", type=int, help="linear probe / fine-tune epochs (defaults: 100 / 500)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--probe-optimizer", choices=tuple(PROBE_LR), default="adam",
                        help="linear probe: adam, lr 1e-3 (default, our choice) or sgd, lr 0.1 (CoCLR's)")
    parser.add_argument("--amp", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="feature passes and fine-tune in fp32 (default, the paper's) or under bf16 autocast "
                             "(auto: bf16 on GPUs of compute capability >= 8.0); the linear probe stays fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the files say, before anything is read."""
    for flag in ("batch_size", "num_threads", "frames_per_clip", "window_stride", "crop_size", "epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')}={value}: must be at least 1")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UsageError(f"--heldout-fraction={args.heldout_fraction}: must be between 0 and 1 (default 0.1)")
    if args.protocol == "finetune" and args.batch_size < 2:
        raise UsageError(f"--batch-size={args.batch_size}: the fine-tune trains batch norm on batch statistics, "
                         "which needs at least 2 clips per process and step")
    if args.checkpoint_flow and not args.checkpoint:
        raise UsageError("--checkpoint-flow needs an RGB --checkpoint (two-stream); evaluate a flow checkpoint "
                         "alone with --checkpoint FLOW.pt")
    device = args.device.split(":")[0]
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: choose cpu, cuda or cuda:N")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch sees no CUDA device; use --device cpu")
    if args.amp == "bf16" and device != "cuda":
        raise UsageError(f"--amp bf16 needs --device cuda (got {args.device}); use --amp fp32 or auto")
    for path in filter(None, (args.checkpoint, args.checkpoint_flow)):
        check_checkpoint_path(Path(path))
    check_backend(args.backend, "--backend dali", "--backend baseline")
    if args.backbone is not None and not args.random_init:  # was ignored: the checkpoint's encoder is evaluated
        raise UsageError(f"--backbone {args.backbone} goes with --random-init; a checkpoint's encoder is the backbone "
                         "it was trained with: leave --backbone out")


def say_if_still_training(checkpoint: Path) -> None:
    """A fine-tune resumes from its file only while its checkpoint stays where it was: a run still
    training rotates its old checkpoints away (run.keep_checkpoints), so it says so before it starts."""
    holder = lock_holder(checkpoint.parent)
    if holder is not None:
        say(f"note: {checkpoint.parent} is still training (pid {holder}) and may delete {checkpoint.name} "
            "(run.keep_checkpoints); an interrupted fine-tune resumes only while that file is there: copy it "
            "elsewhere first to be safe")


def check_checkpoint_path(path: Path) -> None:
    if path.is_dir():
        found = sorted(path.glob("checkpoint-*.pt"))
        hint = f"e.g. its latest, {found[-1]}" if found else "it holds none: pass a run's checkpoint-*.pt file"
        raise UsageError(f"checkpoint {path} is a directory; give one checkpoint file ({hint})")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; give a checkpoint-*.pt file from a run directory")


def load_encoders(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, str], list[dict[str, Any]]]:
    """{modality: encoder}, {modality: where it came from} and each checkpoint's training config
    (none for --random-init) from the CLI's checkpoint options."""
    if args.random_init:
        from cvtcl.models import Encoder

        torch.manual_seed(args.seed)
        # the source names the backbone: the results say what was evaluated, and a fine-tune's resume
        # file (named by a hash of its sources) is never another backbone's
        backbone = args.backbone or "s3d"
        source = f"random-init {backbone}"
        return {args.random_init: Encoder(args.random_init, backbone)}, {args.random_init: source}, []
    try:
        from cvtcl.checkpoint import load_encoder
    except ImportError as err:
        raise UsageError(f"cannot load checkpoints: {err}; install cvtcl with its trainer (pip install -e .)") from None
    encoders, sources, configs = {}, {}, []
    for flag, path in (("--checkpoint", args.checkpoint), ("--checkpoint-flow", args.checkpoint_flow)):
        if not path:
            continue
        try:
            encoder, config = load_encoder(path, map_location="cpu")
        except Exception as err:  # torch.load of a file that is not a checkpoint raises anything
            reason = getattr(err, "reason", None) or brief(err)  # CheckpointLoadError: torch's error, briefly
            raise UsageError(f"{flag} {path}: not a cvtcl checkpoint ({reason}); "
                             "give a checkpoint-*.pt file of cvtcl.train") from None
        modality = getattr(encoder, "modality", None)
        wanted = {"--checkpoint": "rgb", "--checkpoint-flow": "flow"}[flag] if args.checkpoint_flow else modality
        if modality != wanted:  # with both flags, each its own modality (the results go next to the RGB one)
            raise UsageError(f"{flag} {path} holds a {modality} encoder; two-stream takes an RGB --checkpoint and "
                             "a flow --checkpoint-flow")
        encoders[modality], sources[modality] = encoder, str(path)
        configs.append(config or {})
    if args.checkpoint_flow and set(encoders) != {"rgb", "flow"}:
        raise UsageError(f"two-stream needs an RGB --checkpoint and a flow --checkpoint-flow, got {sources}")
    return encoders, sources, configs


def clip_shape(args: argparse.Namespace, trained: list[dict[str, Any]], encoders: dict[str, nn.Module]) -> None:
    """Frames and crop size from the checkpoints' training configs unless given (32 and 128 without
    one); checked against the backbone's smallest input."""
    from cvtcl.config import MIN_INPUT

    for key, default in (("frames_per_clip", 32), ("crop_size", 128)):  # flag and config key share the name
        if getattr(args, key) is not None:
            continue
        values = {int(config.get("data", {}).get(key, default)) for config in trained} or {default}
        if len(values) > 1:
            raise UsageError(f"the two checkpoints were trained with different data.{key} ({sorted(values)}); "
                             f"choose one with --{key.replace('_', '-')}")
        setattr(args, key, values.pop())
    strided = sorted({int(config.get("data", {}).get("frame_stride", 1)) for config in trained} - {1})
    if strided:  # the windows would span 1/stride of the time the encoder learned from, silently
        raise UsageError(f"the checkpoint was trained on frames {strided[0]} apart (data.frame_stride={strided[0]}); "
                         "evaluation reads consecutive frames, as the paper trains: evaluate a run trained with "
                         "data.frame_stride=1")
    if args.window_stride is None:
        args.window_stride = max(1, args.frames_per_clip // 2)
    for modality, encoder in encoders.items():
        backbone = getattr(encoder, "backbone_name", args.backbone or "s3d")
        min_frames, min_size = MIN_INPUT.get(backbone, (1, 1))
        if args.frames_per_clip < min_frames or args.crop_size < min_size:
            raise UsageError(f"the {modality} encoder ({backbone}) needs >= {min_frames} frames and >= {min_size} "
                             f"pixels: raise --frames-per-clip ({args.frames_per_clip}) "
                             f"or --crop-size ({args.crop_size})")


def check_dataset(args: argparse.Namespace, manifest: Any, modalities: Sequence[str]) -> None:
    if manifest.dataset != args.dataset:
        raise UsageError(f"{args.shards}/manifest.json holds dataset {manifest.dataset!r}, not {args.dataset!r}; "
                         f"pass --dataset {manifest.dataset} or the --shards of {args.dataset}")
    subsets = manifest.splits.get(args.split)
    if not subsets:
        raise UsageError(f"--split {args.split}: {args.shards} has no such split; splits there: "
                         f"{', '.join(sorted(manifest.splits)) or 'none'}")
    if not subsets.get("train") or not subsets.get("test"):
        counts = " and ".join(f"{len(subsets.get(name, ()))} {name}" for name in ("train", "test"))
        raise UsageError(f"--split {args.split}: {args.shards} has {counts} videos in it, and evaluation needs both "
                         "(its split files say which videos are test videos)")
    why = too_few_to_centre(len(subsets["test"]), len(subsets["train"])) if args.protocol == "retrieval" else None
    if why is not None:
        raise UsageError(f"--split {args.split} of {args.shards} has {why}; use the linear probe or another split")
    if "flow" in modalities and not manifest.has_flow:
        raise UsageError(f"{args.shards} was preprocessed without flow, and a flow encoder was given; evaluate "
                         "an RGB checkpoint, or re-run cvtcl-preprocess with a flow backend")
    if "flow" in modalities:
        manifest.check_flow_frames(set(subsets["train"]) | set(subsets["test"]), args.shards)


def check_heldout(args: argparse.Namespace, manifest: Any) -> None:
    """The linear probe and the fine-tune choose their epoch on held-out train groups: that there
    are some is known from the manifest, before any feature pass or training."""
    names = set(manifest.splits[args.split]["train"])
    try:
        heldout_split([v for v in manifest.videos if v.name in names], args.heldout_fraction, args.seed)
    except ValueError as err:
        raise UsageError(f"--shards {args.shards} --split {args.split}: {err}; use retrieval, which selects "
                         "nothing, or a dataset whose classes have several source groups") from None


def output_paths(out_dir: Path, protocol: str, dataset: str, split: str) -> tuple[Path, Path | None]:
    """(results, neighbours) paths in out_dir that do not exist yet: a rerun adds -2, -3, ... rather
    than overwrite an earlier evaluation. Only the files this protocol writes count: retrieval
    writes both and numbers them together; linear and finetune write no neighbours (None), so a
    retrieval's neighbours file does not move their results to -2."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a directory")
    first = [report.results_path(out_dir, protocol, dataset, split)]
    if protocol == "retrieval":
        first.append(report.neighbours_path(out_dir, dataset, split))
    n = 1
    while True:
        suffix = f"-{n}" if n > 1 else ""
        paths = [path.with_name(f"{path.stem}{suffix}.json") for path in first]
        if any(p.resolve().parent != out_dir.resolve() for p in paths):  # a split named like a path
            raise UsageError(f"--split {split!r} would write outside {out_dir}; use a split id such as 1")
        if not any(p.exists() for p in paths):
            return paths[0], paths[1] if len(paths) > 1 else None
        n += 1


def check_writable(out_dir: Path, given: str) -> None:
    """Results can be written in out_dir, said before any work (a pass takes minutes, a fine-tune
    hours): a file created and removed there, and the folders made for it removed again (an
    evaluation refused later leaves nothing). `given`: how out_dir was chosen, for the message."""
    made = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        where = f"--out {out_dir}" if given == "--out" else f"{out_dir} ({given}, where results go without --out)"
        raise UsageError(f"{where}: cannot write there ({err.strerror}); give a writable --out") from None
    finally:
        for folder in made:  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def claim_output_paths(out_dir: Path, protocol: str, dataset: str, split: str) -> tuple[Path, Path | None]:
    """`output_paths`, each file created empty and exclusively when the results are ready: an
    evaluation that started earlier into the same directory and finished a moment before has
    taken its names (numbered when it started, both would write the same file, the last one winning)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    while True:
        paths = output_paths(out_dir, protocol, dataset, split)
        claimed = []
        try:
            for path in filter(None, paths):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                claimed.append(path)
            return paths
        except FileExistsError:  # taken since output_paths looked: the next number
            for path in claimed:
                path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    check_arguments(args)
    from cvtcl.data import build_eval_loader, build_pretrain_loader
    from preprocess.schema import check_not_being_written, load_manifest

    check_not_being_written(args.shards)
    manifest = load_manifest(args.shards)
    encoders, sources, trained = load_encoders(args)
    if args.protocol == "finetune":
        for path in filter(None, (args.checkpoint, args.checkpoint_flow)):
            say_if_still_training(Path(path))
    check_dataset(args, manifest, list(encoders))
    clip_shape(args, trained, encoders)
    # Next to the checkpoint by default: the evaluation belongs to the run that trained it.
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent if args.checkpoint else Path.cwd()
    output_paths(out_dir, args.protocol, args.dataset, args.split)  # a bad --out or --split: said before any work
    if distributed.env_world()[0] == 0:  # the process that writes them: two probing at once removed
        # each other's folder (torchrun: "cannot write there (No such file or directory)")
        check_writable(out_dir, given="--out" if args.out else "the checkpoint's folder" if args.checkpoint
                       else "the current directory")
    if args.protocol in ("linear", "finetune"):
        check_heldout(args, manifest)
    device = torch.device(args.device)
    if distributed.env_world()[2] > 1:  # under torchrun: LOCAL_RANK picks the GPU
        device = distributed.init(device.type).device
        args.device = str(device)
    on_gpu = device.type == "cuda"
    common = dict(split=args.split, frames_per_clip=args.frames_per_clip, crop_size=args.crop_size,
                  device="cuda" if on_gpu else "cpu", device_id=(device.index or 0) if on_gpu else None,
                  num_threads=args.num_threads, backend=args.backend)

    def make_loader(subset: str, modality: str, crops: str, videos: Sequence[str] | None = None) -> Any:
        return build_eval_loader(args.shards, subset=subset, modality=modality, crops=crops, videos=videos,
                                 window_stride=args.window_stride, batch_size=args.batch_size, **common)

    def make_train(modality: str, videos: Sequence[str]) -> Any:  # fine-tune: augmented clips of those train videos
        world = distributed.world_size()
        if len(videos) < args.batch_size * world:
            raise UsageError(f"--batch-size {args.batch_size}: the fine-tune trains on {len(videos)} videos of split "
                             f"{args.split} (its train videos less the held-out ones), fewer than one step of "
                             f"{args.batch_size} clips on each of {world} process(es); lower --batch-size")
        return build_pretrain_loader(args.shards, subset="train", videos=videos, modalities=(modality,),
                                     batch_size=args.batch_size, pair_mode="same", seed=args.seed,
                                     augment=FinetuneConfig.augment, rank=distributed.rank(), world_size=world, **common)

    payload: dict[str, Any] = {"protocol": args.protocol, "dataset": args.dataset, "split": args.split,
                               "shards": str(Path(args.shards).resolve()), "encoders": sources,
                               "bn_mode": args.bn_mode, "seed": args.seed,
                               "frames_per_clip": args.frames_per_clip, "crop_size": args.crop_size,
                               "window_stride": args.window_stride, "backend": args.backend,
                               "amp": PRECISION[autocast_dtype(args.amp, device)],
                               "processes": distributed.world_size(), "batch_size": args.batch_size,
                               "device": provenance.device_info(device)}
    resume = resume_files(args, out_dir, sources, device) if args.protocol == "finetune" else {}
    try:
        with contextlib.ExitStack() as held:
            if distributed.rank() == 0:  # the process that writes the resume files
                for file in resume.values():  # the same command twice at once: one resume file
                    held.enter_context(exclusive_dir(out_dir, f"cvtcl.eval finetune of {file.path.name}",
                                                     name=f".{file.path.name}.lock"))
                if resume:
                    remove_temporaries(out_dir)  # those of fine-tunes killed while they saved
            payload["results"], neighbours = run_protocol(args, encoders, make_loader, make_train, manifest, resume)
    except torch.OutOfMemoryError:
        raise RunFailed(f"out of {device.type} memory with --batch-size {args.batch_size} "
                        f"({memory_report(device)}): lower --batch-size") from None
    except KeyboardInterrupt:
        # the fine-tune saves every finished epoch and a rerun continues from it; retrieval and the
        # linear probe keep nothing, and neither does a fine-tune stopped in its first epoch
        saved = [str(file.path) for file in resume.values() if file.path.is_file()]
        if not saved:
            raise
        raise KeyboardInterrupt(f"the fine-tune's finished epochs are saved in {', '.join(saved)}; "
                                "rerun the same command to resume") from None
    finally:
        rank = distributed.rank()
        distributed.shutdown()
    payload["versions"] = provenance.versions()  # after the passes: the loaders imported DALI or OpenCV
    if rank != 0:  # the first process writes the results
        return payload
    results_file, neighbours_file = claim_output_paths(out_dir, args.protocol, args.dataset, args.split)
    try:
        if neighbours is not None:
            report.write_results(neighbours_file, neighbours)
        path = report.write_results(results_file, payload)
    except OSError as err:  # a full disk: no empty claimed name left, which a rerun would number past
        for claimed in filter(None, (results_file, neighbours_file)):
            claimed.unlink(missing_ok=True)
        kept = " (the fine-tune's epochs are saved: it resumes)" if resume else ""
        raise UsageError(f"cannot write {err.filename or results_file} ({err.strerror}); free space and rerun "
                         f"the same command{kept}") from None
    for file in resume.values():  # the results hold everything now
        file.remove()
    title = f"{args.protocol} on {args.dataset} split {args.split}"
    report.print_table(report.results_table(title, payload["results"]))
    print(f"results: {path}")
    return payload


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))


def resume_files(args: argparse.Namespace, out_dir: Path, sources: dict[str, str],
                 device: torch.device) -> dict[str, ResumeFile]:
    """Per modality, the fine-tune's resume file in `out_dir`, named by a hash of everything its
    result depends on: a rerun of the same command continues it, any other command starts afresh."""
    def source(value: str) -> Any:  # a checkpoint is known by its path, size and modification time
        path = Path(value)
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else value

    files = {}
    for modality, origin in sources.items():
        fingerprint = {"source": source(origin), "modality": modality, "dataset": args.dataset,
                       "split": args.split, "shards": str(Path(args.shards).resolve()),
                       "config": dataclasses.asdict(finetune_config(args)), "batch_size": args.batch_size,
                       "frames_per_clip": args.frames_per_clip, "crop_size": args.crop_size,
                       "window_stride": args.window_stride, "heldout_fraction": args.heldout_fraction,
                       "backend": args.backend, "device": device.type, "amp": args.amp,
                       "processes": distributed.world_size()}
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        path = out_dir / f"finetune-{args.dataset}-split{args.split}-{modality}-{digest}.resume.pt"
        files[modality] = ResumeFile(path, fingerprint)
    return files


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp as an autocast dtype (None: fp32). auto: bf16 where the GPU has it (compute capability
    >= 8.0); fp16 is not offered, as the fine-tune would need a loss scaler for it."""
    if amp == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16 if amp == "bf16" or torch.cuda.get_device_capability(device) >= (8, 0) else None


def run_protocol(args: argparse.Namespace, encoders: dict[str, nn.Module], make_loader: Callable[..., Any],
                 make_train: Callable[[str, Sequence[str]], Any], manifest: Any,
                 resume: dict[str, ResumeFile]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the protocol's results, retrieval's neighbours to write or None): fine-tune, or features of
    both subsets then retrieval or the probe. The encoders run under --amp's autocast (an ambient
    setting: every forward inside it)."""
    device = torch.device(args.device)
    dtype = autocast_dtype(args.amp, device)
    mixed = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    if args.protocol == "finetune":
        with mixed:
            return run_finetune(encoders, make_loader, make_train, len(manifest.classes), device=args.device,
                                config=finetune_config(args), heldout_fraction=args.heldout_fraction,
                                resume=resume), None
    with mixed:
        train, test = split_features(encoders, make_loader, device=args.device, bn_mode=args.bn_mode, log=say)
    if distributed.rank() != 0:  # under torchrun the first process evaluates the features and writes
        return {}, None
    if args.protocol == "retrieval":
        results, tops = run_retrieval(train, test)
        any_modality = next(iter(train))
        return results, report.neighbours_payload(args.shards, manifest.classes, test[any_modality],
                                                  train[any_modality], tops)
    config = LinearProbeConfig(seed=args.seed, optimizer=args.probe_optimizer, lr=PROBE_LR[args.probe_optimizer],
                               **({"epochs": args.epochs} if args.epochs else {}))
    return run_linear(train, test, len(manifest.classes), config, args.heldout_fraction), None


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m cvtcl.eval`: expected errors as one line (cvtcl/errors.py), exit 2; 130 after Ctrl-C."""
    def body(args: list[str]) -> int:
        main(args)
        return EXIT_OK

    return run_command("cvtcl.eval", body, argv)


if __name__ == "__main__":
    sys.exit(cli())
