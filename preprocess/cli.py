"""`cvtcl-preprocess`: ucf101 | hmdb51 | kinetics400 | synthetic | verify | merge.

`--part I/N` (0-based I) packs 1/N of the shards into a shared --out; `merge OUT` writes the
manifest once every part is complete (preprocess/parts.py).

Exit status: 0 every video packed (verify: no problem); 3 some videos failed and were recorded in
the manifest, the dataset (or the part) was written; 2 usage or configuration error (bad flag,
missing root or split file, an --out made with other parameters, unwritable output, no GPU for
--flow-device cuda; merge: a part not complete), nothing packed; 1 verify found problems (each
listed on stderr); 130 Ctrl-C and 143 SIGTERM (finished shards are kept: rerun to resume).
Errors are one line; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from cvtcl.errors import one_line
from preprocess.datasets import DatasetError, DatasetIndex, index_hmdb51, index_ucf101
from preprocess.flow import backend_names
from preprocess.flow_workers import FlowWorkerError, resolve_flow_devices
from preprocess.hygiene import WorkerDied
from preprocess.kinetics import index_kinetics400
from preprocess.pack import EXIT_CONFIG, EXIT_OK, EXIT_SOME_FAILED, ConfigError, PackOptions, locked_out, pack
from preprocess.parts import Part, marker_path, merge, pack_part
from preprocess.schema import LayoutError, check_not_being_written, shard_name
from preprocess.synthetic import SyntheticConfig, generate_raw
from preprocess.verify import verify

EXIT_PROBLEMS = EXIT_FAILED = 1  # verify found problems; a run failed after it started (a flow worker)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports 128 + SIGINT


def _pack_flags(parser: argparse.ArgumentParser, parts: bool = True) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset directory (shards + manifest.json)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    parser.add_argument("--videos-per-shard", type=int, default=64,
                        help="videos per HDF5 shard (default 64: UCF101 in 209 shards); a shard is the "
                             "unit of resuming and of --part")
    parser.add_argument("--short-side", type=int, default=None, help="resize so the shorter side is N px (default: native)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="RGB JPEG quality (default 90)")
    parser.add_argument("--flow-jpeg-quality", type=int, default=95,
                        help="quality of the flow planes' JPEG (default 95, OpenCV's imwrite default)")
    parser.add_argument("--flow", choices=backend_names(), default="tvl1", help="flow backend: tvl1 (the default) = opencv-tvl1, OpenCV's DualTVL1 on the CPU; "
                        "tvl1-torch, the same step for step in PyTorch (GPUs: --flow-device cuda); none (RGB only)")
    parser.add_argument("--flow-device", default=None,
                        help="device for backends that take one: cpu, cuda (every visible GPU) or cuda:N")
    parser.add_argument("--flow-devices", default=None, help="GPU indices for the flow workers, e.g. 0,1")
    parser.add_argument("--flow-workers-per-gpu", type=int, default=None,
                        help="flow worker processes per GPU (default: 2, fewer if GPU memory or cores are short)")
    parser.add_argument("--flow-batch", type=int, default=None, help="frame pairs per call for batched backends")
    if parts:  # not for synthetic: parts would generate the same raw videos at once
        _part_flag(parser)
    _debug_flag(parser)


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")


def _parse_part(text: str) -> Part:
    try:
        return Part.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _part_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", type=_parse_part, default=None, metavar="I/N",
                        help="only part I of N (0-based: 0..N-1), the shards i with i %% N == I; then `merge OUT`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvtcl-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    ucf = commands.add_parser("ucf101", help="pack UCF101 (official layout under --root)")
    ucf.add_argument("--root", required=True, type=Path, help="folder holding UCF-101/ and ucfTrainTestlist/")
    _pack_flags(ucf)

    hmdb = commands.add_parser("hmdb51", help="pack HMDB51 (<root>/<class>/<video>.avi + split folder)")
    hmdb.add_argument("--root", required=True, type=Path, help="folder of class folders of .avi files")
    hmdb.add_argument("--splits", required=True, type=Path, help="folder of <class>_test_split{1,2,3}.txt")
    _pack_flags(hmdb)

    k400 = commands.add_parser("kinetics400", help="pack Kinetics-400 (videos anywhere under --root + the official CSVs)")
    k400.add_argument("--root", required=True, type=Path,
                      help="folder holding <youtube_id>_<start:06d>_<end:06d>.mp4 files (flat or in class folders)")
    k400.add_argument("--annotations", required=True, type=Path, help="folder of train.csv, validate.csv[, test.csv]")
    _pack_flags(k400)

    syn = commands.add_parser("synthetic", help="generate the synthetic motion dataset (UCF101 layout) and pack it")
    defaults = SyntheticConfig()
    syn.add_argument("--classes", type=int, default=defaults.classes)
    syn.add_argument("--videos-per-class", type=int, default=defaults.videos_per_class)
    syn.add_argument("--clips-per-group", type=int, default=defaults.clips_per_group)
    syn.add_argument("--test-groups", type=int, default=None,
                     help="test groups per class in split 1 (default: UCF101's 7 of 25, scaled)")
    syn.add_argument("--frames", type=int, default=defaults.frames)
    syn.add_argument("--height", type=int, default=defaults.height)
    syn.add_argument("--width", type=int, default=defaults.width)
    syn.add_argument("--fps", type=float, default=defaults.fps)
    syn.add_argument("--seed", type=int, default=defaults.seed)
    _pack_flags(syn, parts=False)

    ver = commands.add_parser("verify", help="re-read every shard, check checksums and counts, decode every frame")
    ver.add_argument("dir", type=Path)
    ver.add_argument("--workers", type=int, default=1)
    _part_flag(ver)
    _debug_flag(ver)

    mer = commands.add_parser("merge", help="after a run split with --part: check every part, write the manifest")
    mer.add_argument("dir", type=Path)
    _debug_flag(mer)
    return parser


def pack_options(args: argparse.Namespace) -> PackOptions:
    flow_options = {}
    if args.flow_device is not None:
        flow_options["device"] = args.flow_device
    if args.flow_batch is not None:
        flow_options["batch"] = args.flow_batch
    flow_devices = resolve_flow_devices(args.flow, args.flow_device, args.flow_devices, args.flow_workers_per_gpu,
                                        args.flow_batch)
    return PackOptions(
        out=str(args.out), workers=args.workers, videos_per_shard=args.videos_per_shard,
        jpeg_quality=args.jpeg_quality, flow_jpeg_quality=args.flow_jpeg_quality, short_side=args.short_side,
        flow=args.flow, flow_options=flow_options, flow_devices=flow_devices,
    )


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        classes=args.classes, videos_per_class=args.videos_per_class, clips_per_group=args.clips_per_group,
        test_groups=args.test_groups, frames=args.frames, height=args.height, width=args.width,
        fps=args.fps, seed=args.seed,
    )


def run_synthetic(config: SyntheticConfig, options: PackOptions) -> int:
    """Generate under OUT/raw, then pack exactly as `ucf101` does into OUT."""
    import dataclasses

    with locked_out(options.out):  # one writer for OUT/raw too, not only for the shards
        raw = generate_raw(config, Path(options.out) / "raw")
        options = dataclasses.replace(options, extra_params={"synthetic": dataclasses.asdict(config)})
        return _pack(index_ucf101(raw, dataset="synthetic"), options)


def _summary(where: str, shards: list, records: list, failed: list) -> int:
    print(f"{where}: {len(records)} videos packed in {len(shards)} shard(s), "
          f"{sum(v.num_frames for v in records)} frames, {len(failed)} failed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _retry_hint(index: DatasetIndex, options: PackOptions, failed: list, record: str) -> None:
    """Which shards to delete so that a rerun packs the failed videos once they are fixed (a rerun
    keeps a complete shard, its failed videos with it)."""
    if not failed:
        return
    position = {v.name: i for i, v in enumerate(index.videos)}  # the shard plan: name order
    shards = sorted({shard_name(position[f.name] // options.videos_per_shard) for f in failed})
    print(f"the reasons are in {record} (\"failed\"); a rerun keeps them failed: to pack them "
          f"once fixed, delete {', '.join(shards[:8])}{' …' if len(shards) > 8 else ''} and rerun", file=sys.stderr)


def _pack(index: DatasetIndex, options: PackOptions, part: Part | None = None) -> int:
    if part is None:
        manifest = pack(index, options)
        _retry_hint(index, options, manifest.failed, f"{options.out}/manifest.json")
        return _summary(options.out, manifest.shards, manifest.videos, manifest.failed)
    done = pack_part(index, options, part)
    print(f"part {part} complete; once every part is, run: cvtcl-preprocess merge {options.out}", file=sys.stderr)
    failed = [f for _, fails in done.values() for f in fails]
    _retry_hint(index, options, failed, str(marker_path(options.out, part)))
    return _summary(f"{options.out} part {part}", list(done), [r for recs, _ in done.values() for r in recs], failed)


class Terminated(SystemExit):
    """SIGTERM while the command works: unwinds it (the workers end, finished shards stay)."""


def _exit_on_sigterm(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM unwinds the run (SystemExit 143) while the command works, and the previous handler
    is back once it returns: main() called in-process (tests, scripts) must not leave a handler
    that turns a later SIGTERM to the caller, e.g. pytest's, into SystemExit from here."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:  # None: a handler not set from Python, which Python cannot set back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    """The console script. Expected failures print one line naming the flag or file (the traceback
    with --debug); Ctrl-C exits 130, SIGTERM 143, keeping finished shards."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # verify writes nothing: it starts over; the others keep their finished shards
    kept = "" if args.command == "verify" else "; finished shards are kept, rerun the same command to resume"
    try:
        with _sigterm_exits():
            return _run(args)
    except KeyboardInterrupt:
        print(f"cvtcl-preprocess {args.command}: interrupted (Ctrl-C){kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as stop:  # a scheduler's log said nothing of why the job ended
        print(f"cvtcl-preprocess {args.command}: stopped (SIGTERM){kept}", file=sys.stderr)
        return stop.code
    except (ConfigError, DatasetError, LayoutError, ValueError, OSError) as err:
        if getattr(args, "debug", False):
            traceback.print_exc()  # then the same line and exit status as without it
        print(f"cvtcl-preprocess {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_CONFIG
    except (FlowWorkerError, WorkerDied) as err:  # the run started: finished shards are kept
        if getattr(args, "debug", False):
            traceback.print_exc()
        then = ("rerun it" if args.command == "verify" else
                "the finished shards are kept: rerun the same command to resume")
        print(f"cvtcl-preprocess {args.command}: error: {err}; {then}", file=sys.stderr)
        return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        if not args.dir.is_dir():
            raise ConfigError(f"{args.dir} is not a directory")
        check_not_being_written(args.dir)
        problems = verify(args.dir, workers=args.workers, part=args.part)
        for problem in problems:
            print(f"PROBLEM {problem}", file=sys.stderr)
        if problems:  # a rerun rebuilds damaged and missing shards, keeps sound ones, rewrites the manifest
            print(f"{args.dir}: {len(problems)} problem(s); to repair, rerun the cvtcl-preprocess command that wrote "
                  "it (same flags): it rebuilds damaged or missing shards and keeps sound ones", file=sys.stderr)
        else:
            print(f"{args.dir}: OK", file=sys.stderr)
        return EXIT_PROBLEMS if problems else EXIT_OK
    if args.command == "merge":
        manifest = merge(args.dir)
        return _summary(str(args.dir), manifest.shards, manifest.videos, manifest.failed)
    if args.command == "synthetic":
        return run_synthetic(synthetic_config(args), pack_options(args))
    options = pack_options(args)
    if args.command == "ucf101":
        return _pack(index_ucf101(args.root), options, args.part)
    if args.command == "kinetics400":
        return _pack(index_kinetics400(args.root, args.annotations), options, args.part)
    return _pack(index_hmdb51(args.root, args.splits), options, args.part)


if __name__ == "__main__":
    sys.exit(main())
