"""Every console command fails clearly: a table of bad inputs across `cvtcl-preprocess`,
`python -m cvtcl.train`, `python -m cvtcl.eval` and `cvtcl-plot`, each with the exit status the
README documents ("Exit status") and one line naming the flag, key or file. None may end in a
traceback. The commands run in this process (their `main`/`cli` with an argv list), except a few
real subprocesses at the end that check the console entry points themselves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from cvtcl import errors, plot, train
from cvtcl import eval as cvtcl_eval
from cvtcl.checkpoint import save_checkpoint
from cvtcl.models import Encoder
from cvtcl.moco import MomentumContrast
from cvtcl.retrieval import centred_cosine
from dali_pipelines.toy_shards import write_toy_dataset
from preprocess import cli as preprocess_cli
from preprocess.schema import CorruptFrameError
from processes import lock_held_elsewhere
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def _never_called(**kwargs):
    raise AssertionError("the loader was built before validation finished")


class NanLoader(FakePretrainLoader):
    """Batches of NaN: the first step's loss is not finite."""

    def epoch(self, epoch, start_step=0):
        for batch in super().epoch(epoch, start_step):
            yield {k: v * float("nan") if v.is_floating_point() else v for k, v in batch.items()}


class OutOfMemoryAtStep3(FakePretrainLoader):
    """Two good batches, then the device's allocator gives up (as CUDA would at a batch too large)."""

    def epoch(self, epoch, start_step=0):
        for step, batch in enumerate(super().epoch(epoch, start_step), start_step):
            if step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield batch


def _checkpoint(path: Path, modality: str) -> Path:
    torch.manual_seed(0)
    encoder = Encoder(modality, "tiny", 128)
    config = {"data": {"frames_per_clip": 8, "crop_size": 32}}
    state = {"step": 1, "epoch": 0, "epoch_step": 1, "model": MomentumContrast(encoder, 16).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": config, "complete": True}
    return save_checkpoint(path, state)


def _as_dataset(root: Path, name: str) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(manifest | {"dataset": name}))
    return root


@pytest.fixture(scope="module")
def paths(tmp_path_factory, synthetic_dataset):
    """Every file and directory the table's argv templates name."""
    tmp = tmp_path_factory.mktemp("errors")
    data = _as_dataset(make_dataset(tmp / "data"), "synthetic")
    rgb_only = _as_dataset(make_dataset(tmp / "rgb-only", num_videos=8, with_flow=False), "synthetic")
    single = _as_dataset(write_toy_dataset(tmp / "single", num_videos=8, num_short=1, short_frames=1, height=16,
                                           width=16), "synthetic")
    missing_shard = make_dataset(tmp / "missing-shard", num_videos=4)
    (missing_shard / "shard-00000.h5").unlink()
    bad_manifest = tmp / "bad-manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    damaged = shutil.copytree(synthetic_dataset, tmp / "damaged", ignore=shutil.ignore_patterns("raw"))
    shard = damaged / "shard-00000.h5"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    run = tmp / "run"
    rgb = _checkpoint(run / "rgb", "rgb")
    flow = _checkpoint(run / "flow", "flow")
    (tmp / "text.pt").write_text("this is not a checkpoint\n")
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")  # torch's error for it is paragraphs long
    (tmp / "file").write_text("a file where a directory belongs\n")
    (tmp / "empty").mkdir()
    (tmp / "bad-metrics").mkdir()
    (tmp / "bad-metrics" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{broken\n{"step": 3, "loss": 0.5}\n')
    (tmp / "bad-neighbours").mkdir()
    (tmp / "bad-neighbours" / "retrieval-neighbours-synthetic-split1.json").write_text('{"queries": []}')
    (tmp / "bad.yaml").write_text("optim: [lr: 1\n")
    (tmp / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    (tmp / "wrong-type.yaml").write_text("optim:\n  lr: [1, 2]\n")
    (tmp / "flat.yaml").write_text("lr: 0.1\n")
    (tmp / "binary.yaml").write_bytes(b"optim:\n  lr: \xff\xfe\n")
    return {"tmp": tmp, "data": data, "rgb_only": rgb_only, "missing_shard": missing_shard,
            "bad_manifest": bad_manifest, "single": single, "damaged": damaged, "run": run, "rgb": rgb, "flow": flow,
            "nowhere": tmp / "nowhere", "text": tmp / "text.pt", "module": tmp / "module.pt", "file": tmp / "file",
            "empty": tmp / "empty"}


TRAIN = ["--preset", "smoke", "data.root={data}", "run.out_dir={tmp}/train-out", "loss.queue_size=16",
         "run.progress=none"]
EVAL = ["--dataset", "synthetic", "--shards", "{data}", "--device", "cpu", "--out", "{tmp}/eval-out"]
PACK = ["--out", "{tmp}/pack-out", "--workers", "1"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")

CASES = [
    # cvtcl-preprocess: 2 usage or configuration error, 1 verify found problems
    ("preprocess", ["ucf101", "--root", "{nowhere}", *PACK], 2, "nowhere"),
    ("preprocess", ["hmdb51", "--root", "{empty}", "--splits", "{tmp}/nosplits", *PACK], 2, "nosplits"),
    ("preprocess", ["synthetic", "--classes", "99", *PACK], 2, "--classes"),
    ("preprocess", ["ucf101", "--root", "{empty}", "--jpeg-quality", "101", *PACK], 2, "jpeg-quality"),
    ("preprocess", ["synthetic", "--classes", "2", "--out", "{tmp}/pack-w0", "--workers", "0"], 2, "--workers"),
    ("preprocess", ["synthetic", "--classes", "2", "--short-side", "4", *PACK], 2, "--short-side"),
    pytest.param("preprocess", ["synthetic", "--flow", "tvl1-torch", "--flow-device", "cuda", "--out",
                                "{tmp}/pack-cuda"], 2, "--flow-device cuda: torch sees no CUDA device",
                 marks=NO_GPU, id="preprocess-flow-device-cuda-without-gpu"),
    ("preprocess", ["synthetic", "--out", "{file}"], 2, "file"),
    ("preprocess", ["ucf101", "--root", "{empty}", *PACK, "--flow", "magic"], 2, "invalid choice: 'magic'"),
    ("preprocess", ["ucf101", *PACK], 2, "--root"),
    ("preprocess", ["verify", "{nowhere}"], 2, "is not a directory"),
    ("preprocess", ["verify", "{empty}"], 1, "no manifest.json"),
    ("preprocess", ["verify", "{bad_manifest}"], 1, "not valid JSON"),
    ("preprocess", ["verify", "{damaged}"], 1, "problem"),
    # python -m cvtcl.train: 2 bad input found before any work, 1 the run failed
    ("train", ["--preset", "smokey"], 2, "unknown preset 'smokey': did you mean 'smoke'"),
    ("train", ["data.root=x"], 2, "give --preset NAME or --config FILE"),
    ("train", [*TRAIN, "optim.lrr=1"], 2, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("train", [*TRAIN, "optim.lr=abc"], 2, "config key 'optim.lr': cannot read 'abc' as float"),
    ("train", [*TRAIN, "optim.lr"], 2, "override 'optim.lr' is not key=value"),
    ("train", [*TRAIN, "optim.lr=-1"], 2, "optim.lr=-1.0 must be a finite number > 0"),
    ("train", [*TRAIN, "loss.queue_size=18"], 2, "queue_size=18 is not divisible by the global batch 4"),
    ("train", [*TRAIN, "data.root={nowhere}"], 2, "no manifest.json in"),
    ("train", [*TRAIN, "data.root={bad_manifest}"], 2, "is not valid JSON"),
    ("train", [*TRAIN, "data.root={missing_shard}"], 2, "shard(s) listed in manifest.json are missing"),
    ("train", [*TRAIN, "stage.modality=flow", "data.root={rgb_only}"], 2, "without flow"),
    ("train", [*TRAIN, "data.split=3"], 2, "no split '3'"),
    pytest.param("train", [*TRAIN, "run.device=cuda"], 2, "run.device=cuda but torch sees no CUDA device",
                 marks=NO_GPU, id="train-device-cuda-without-gpu"),
    ("train", [*TRAIN, "optim.amp=bf16", "run.device=cpu"], 2, "optim.amp=bf16 needs a CUDA device"),
    ("train", [*TRAIN, "run.out_dir={file}"], 2, "is a file, not a directory"),
    ("train", [*TRAIN, "run.out_dir={file}/sub"], 2, "is a file, not a directory"),
    ("train", [*TRAIN, "run.out_dir=/proc/cvtcl-nope"], 2, "run.out_dir=/proc/cvtcl-nope: cannot create it"),
    ("train", [*TRAIN, "run.expect_world_size=8"], 2, "laid out for 8 processes"),
    ("train", [*TRAIN, "model.backbone=s3d"], 2, "model.backbone=s3d needs >= 5 frames and >= 32 pixels"),
    ("train", [*TRAIN, "stage.kind=cotrain"], 2, "set stage.sampler_checkpoint"),
    ("train", [*TRAIN, "stage.init_checkpoint={nowhere}.pt"], 2, "stage.init_checkpoint="),
    ("train", [*TRAIN, "--stage", "stage1-rgb"], 2, "use a schedule preset"),
    ("train", ["--preset", "smoke-cvtcl", "data.root={data}", "run.out_dir={tmp}/sched", "loss.queue_size=16",
               "schedule.cotrain_epochs=1"], 2, "Raise schedule.cotrain_epochs above 1 or lower loss.queue_size"),
    ("train", [*TRAIN, "stage.kind=cotrain", "stage.sampler_checkpoint={flow}", "optim.epochs=1"], 2,
     "Raise optim.epochs above 1"),
    # one clip per key-encoder BN group, whose deepest map is one value: crashed at the first step
    ("train", [*TRAIN, "data.batch_size=2", "loss.queue_size=4", "data.crop_size=16"], 2,
     "data.batch_size=2 in loss.bn_groups=2 groups puts one clip in each key-encoder BN group"),
    # top-K mining that takes the whole queue: no negatives (a stage, and a schedule before stage 1)
    ("train", [*TRAIN, "stage.kind=cotrain", "stage.sampler_checkpoint={flow}", "loss.mining_topk=16"], 2,
     "loss.mining_topk=16 is not below loss.queue_size=16"),
    ("train", ["--preset", "smoke-cvtcl", "data.root={data}", "run.out_dir={tmp}/sched", "loss.queue_size=16",
               "loss.mining_topk=100"], 2, "loss.mining_topk=100 is not below loss.queue_size=16"),
    ("train", ["--config", "{tmp}/none.yaml"], 2, "no such file"),
    ("train", ["--config", "{tmp}/bad.yaml"], 2, "not valid YAML"),
    ("train", ["--config", "{tmp}/typo.yaml"], 2, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("train", ["--config", "{tmp}/wrong-type.yaml"], 2, "config key 'optim.lr': expected float, got [1, 2]"),
    ("train", ["--config", "{tmp}/flat.yaml"], 2, "expected sections of key: value"),
    ("train", ["--config", "{tmp}/binary.yaml"], 2, "binary.yaml: not a text file"),
    ("train", ["--preset", "smoke", "--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    ("train-nan", [*TRAIN, "run.out_dir={tmp}/nan"], 1, "non-finite loss at step 1"),
    ("train-oom", [*TRAIN, "run.out_dir={tmp}/oom"], 1, "out of cpu memory after 2 steps with data.batch_size=4"),
    # python -m cvtcl.eval: 2 bad input found before any work
    ("eval", ["retrieval", "--checkpoint", "{nowhere}.pt", *EVAL], 2, "does not exist"),
    ("eval", ["retrieval", "--checkpoint", "{run}/rgb", *EVAL], 2, "is a directory; give one checkpoint file"),
    ("eval", ["retrieval", "--checkpoint", "{text}", *EVAL], 2, "not a cvtcl checkpoint"),
    ("eval", ["linear", "--checkpoint", "{module}", *EVAL], 2,
     "--checkpoint {module}: not a cvtcl checkpoint (UnpicklingError: Weights only load failed); "
     "give a checkpoint-*.pt file of cvtcl.train"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", "--dataset", "synthetic"], 2, "--shards"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--shards", "{nowhere}"], 2, "no manifest.json in"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--split", "3"], 2, "--split 3:"),
    pytest.param("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--device", "cuda"], 2,
                 "--device cuda: torch sees no CUDA device", marks=NO_GPU, id="eval-device-cuda-without-gpu"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--device", "tpu"], 2, "--device tpu"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--batch-size", "0"], 2, "--batch-size=0"),
    ("eval", ["finetune", "--checkpoint", "{rgb}", *EVAL, "--amp", "bf16"], 2, "--amp bf16 needs --device cuda"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--window-stride", "0"], 2, "--window-stride=0"),
    ("eval", ["linear", "--checkpoint", "{rgb}", *EVAL, "--heldout-fraction", "1.5"], 2, "--heldout-fraction"),
    ("eval", ["retrieval", "--random-init", "rgb", "--backbone", "s3d", "--crop-size", "16", *EVAL], 2,
     "needs >= 5 frames and >= 32 pixels"),
    ("eval", ["retrieval", "--checkpoint", "{flow}", *EVAL, "--shards", "{rgb_only}"], 2, "without flow"),
    ("eval", ["retrieval", "--checkpoint", "{flow}", *EVAL, "--shards", "{single}"], 2,
     "1 video(s) of a single frame have no flow (first: v_class1_g03_c01)"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--dataset", "ucf101"], 2, "holds dataset 'synthetic'"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", "--checkpoint-flow", "{rgb}", *EVAL], 2,
     "--checkpoint-flow {rgb} holds a rgb encoder; two-stream takes an RGB --checkpoint and a flow --checkpoint-flow"),
    ("eval", ["retrieval", "--checkpoint", "{flow}", "--checkpoint-flow", "{flow}", *EVAL], 2,
     "--checkpoint {flow} holds a flow encoder"),
    ("eval", ["retrieval", "--checkpoint", "{flow}", "--checkpoint-flow", "{rgb}", *EVAL], 2,  # swapped: was taken
     "--checkpoint {flow} holds a flow encoder"),
    ("eval", ["retrieval", "--random-init", "rgb", "--checkpoint-flow", "{flow}", *EVAL], 2,
     "--checkpoint-flow needs an RGB --checkpoint"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--out", "{file}"], 2, "is a file; give a directory"),
    ("eval", ["ranking", "--checkpoint", "{rgb}", *EVAL], 2, "invalid choice: 'ranking'"),
    ("eval", ["retrieval", "--checkpoint", "{rgb}", "--backbone", "s3d", *EVAL], 2,  # was ignored
     "--backbone s3d goes with --random-init; a checkpoint's encoder is the backbone it was trained with"),
    # 1: the work started and failed
    ("eval-oom", ["retrieval", "--checkpoint", "{rgb}", *EVAL, "--out", "{tmp}/eval-oom"], 1,
     "out of cpu memory with --batch-size 8 (cpu, process peak"),
    # cvtcl-plot: 2 bad input
    ("plot", ["{nowhere}"], 2, "is not a directory"),
    ("plot", ["{empty}"], 2, "nothing to plot"),
    ("plot", ["{tmp}/bad-metrics"], 2, "metrics.jsonl"),
    ("plot", ["{tmp}/bad-neighbours"], 2, "not a retrieval-neighbours file"),
    ("plot", ["{empty}", "--queries", "0"], 2, "--queries=0"),
    ("plot", ["{tmp}/bad-metrics", "--out", "{file}"], 2, "is a file"),
]


def _run(command, argv):
    if command == "preprocess":
        return preprocess_cli.main(argv)
    if command == "train":
        return train.cli(argv, build_loader=_never_called)
    if command == "train-nan":
        return train.cli(argv, build_loader=NanLoader)
    if command == "train-oom":
        return train.cli(argv, build_loader=OutOfMemoryAtStep3)
    if command == "eval":
        return cvtcl_eval.cli(argv)
    if command == "eval-oom":
        with mock.patch.object(cvtcl_eval, "extract_features", side_effect=torch.OutOfMemoryError("CUDA out of memory")):
            return cvtcl_eval.cli(argv)
    return plot.main(argv)


def _case_id(case):
    command, argv, status, message = case
    return f"{command}-{status}-{' '.join(a for a in argv if not a.startswith('{'))[:40]}"


@pytest.mark.parametrize("command,argv,status,message",
                         [c if hasattr(c, "values") else pytest.param(*c, id=_case_id(c)) for c in CASES])
def test_bad_input_is_one_line_with_the_documented_status(paths, capsys, command, argv, status, message):
    argv = [a.format(**paths) for a in argv]
    try:
        got = _run(command, argv)
    except SystemExit as exit_:  # argparse: usage line + one error line, status 2
        got = exit_.code
    err = capsys.readouterr().err
    print(err)  # shown with -rP: the messages as a user sees them
    assert got == status, err
    assert "Traceback" not in err
    assert message.format(**paths) in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if command in ("train", "train-nan", "train-oom", "eval", "eval-oom", "plot") and "usage:" not in err:
        assert len(lines) == 1, err  # exactly one line, naming what to fix
    assert any(message.format(**paths) in line and "error" in line.lower() or status == 1 for line in lines)
    if command == "preprocess" and status == 2 and "--out" in argv and argv[argv.index("--out") + 1] != str(paths["file"]):
        assert not Path(argv[argv.index("--out") + 1]).exists()  # nothing packed, nothing left behind
    if command in ("train", "eval"):  # refused before any work: no run or results directory
        assert not any((paths["tmp"] / name).exists() for name in ("train-out", "sched", "eval-out"))


def test_out_of_memory_names_what_to_change(tmp_path, monkeypatch):
    """The advice fits the run: processes in the queue rule, half precision only where the run is in
    fp32 on a GPU, a new run directory only where checkpoints of this batch size exist."""
    from cvtcl.presets import get_preset

    monkeypatch.setattr(train, "memory_report", lambda device: "MEMORY")
    config = get_preset("smoke")
    ctx = SimpleNamespace(device=torch.device("cuda", 0), autocast_dtype=None, step=7)
    message = str(train.out_of_memory(config, ctx, 8, tmp_path))
    assert message.startswith("out of cuda memory after 7 steps with data.batch_size=4 (MEMORY): "), message
    assert "loss.queue_size=32 must stay a multiple of it x 8 processes" in message
    assert "optim.amp=auto" in message and "run.out_dir" not in message
    _checkpoint(tmp_path, "rgb")
    ctx.autocast_dtype = torch.bfloat16
    message = str(train.out_of_memory(config, ctx, 1, tmp_path))
    assert "x 1 process)" in message and "optim.amp" not in message
    assert f"in a new run.out_dir ({tmp_path} has checkpoints of this batch size)" in message


@pytest.mark.parametrize("reserved_gib,fragmented", [(78, True), (72, False)])
def test_gpu_memory_report(monkeypatch, reserved_gib, fragmented):
    """Figures from the CUDA allocator (faked here); the allocator tip only where it holds much more
    than the tensors' peak."""
    from cvtcl.engine import memory_report

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (gib // 2, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "GPU X")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 70 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved_gib * gib)
    report = memory_report(torch.device("cuda", 0))
    assert report.startswith(f"GPU X: 80.0 GiB, 0.5 GiB free, tensors peaked at 70.0 GiB, the allocator holds "
                             f"{reserved_gib}.0 GiB"), report
    assert ("expandable_segments:True" in report) == fragmented


@pytest.mark.parametrize("error", [
    ValueError("a video of 1 frame(s) has no flow:\ndrop it"),
    CorruptFrameError("video v_a rgb frame 3 (shard 0) fails its checksum"),
])
def test_a_dataloader_workers_error_is_its_own_message(error):
    """torch's DataLoader raises a worker's error in the parent with the whole traceback as its text:
    the one line was 1,300 characters of frames before the message."""
    from torch._utils import ExceptionWrapper

    try:
        try:
            raise KeyError("inner")  # a chained error before it: the message is the last one's
        except KeyError:
            raise error
    except type(error):
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(type(error)) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert errors.one_line(raised.value) == " ".join(str(error).split())


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and {c.values[0] if hasattr(c, "values") else c[0] for c in CASES} >= {
        "preprocess", "train", "eval", "plot"}


def test_debug_shows_the_traceback_and_keeps_the_exit_status(paths, capsys):
    """--debug adds the traceback above the one line; the exit status stays the documented one (it
    was Python's 1 for an error that exits 2)."""
    calls = [(lambda argv: train.cli(["--preset", "smokey", *argv]), "smokey"),
             (lambda argv: train.cli(["--preset", "smokey", *("--deb" for _ in argv)]), "smokey"),  # as argparse reads it
             (lambda argv: cvtcl_eval.cli(["retrieval", "--checkpoint", str(paths["nowhere"]), "--dataset", "synthetic",
                                           "--shards", str(paths["data"]), *argv]), "does not exist"),
             (lambda argv: plot.main([str(paths["nowhere"]), *argv]), "is not a directory"),
             (lambda argv: preprocess_cli.main(["verify", str(paths["nowhere"]), *argv]), "is not a directory")]
    for call, message in calls:
        plain = call([])
        assert "Traceback" not in capsys.readouterr().err
        assert call(["--debug"]) == plain == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and message in err.strip().splitlines()[-1], err


def test_ctrl_c_interrupts_the_command_not_its_forked_workers():
    """A terminal's Ctrl-C reaches the loader workers too: they must not raise (and print) on their own."""
    with errors.interrupt_main_process_only():
        pid = os.fork()
        if pid == 0:  # a forked worker
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                os._exit(0)
            except KeyboardInterrupt:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_some_videos_failed_exits_3_and_lists_them(synthetic_dataset, tmp_path, capsys):
    """README "Exit status" 3: the dataset is written and the manifest names the failed video."""
    raw = shutil.copytree(synthetic_dataset / "raw", tmp_path / "raw")
    broken = sorted(raw.rglob("*.avi"))[0]
    broken.write_bytes(b"")
    status = preprocess_cli.main(["ucf101", "--root", str(raw), "--out", str(tmp_path / "out"), "--flow", "none",
                                  "--workers", "1"])
    assert status == 3, capsys.readouterr().err
    failed = json.loads((tmp_path / "out" / "manifest.json").read_text())["failed"]
    assert len(failed) == 1 and broken.stem in json.dumps(failed)


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("argv,message", [
    (["-m", "cvtcl.eval", "linear", "--checkpoint", "{text}", "--dataset", "synthetic", "--shards", "{data}"],
     "cvtcl.eval: error: --checkpoint"),
    (["-m", "cvtcl.plot", "{nowhere}"], "cvtcl-plot: error:"),
    (["-m", "preprocess", "verify", "{nowhere}"], "cvtcl-preprocess verify: error:"),
])
def test_console_entry_points_in_a_subprocess(paths, argv, message):
    done = subprocess.run([sys.executable, *[a.format(**paths) for a in argv]], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr



def test_an_unwritable_out_is_refused_before_any_pass(paths, capsys, monkeypatch):
    """Found when the results were written, after every feature pass (a fine-tune: hours). The
    test runs as root in CI, which any mode bits let write: the refusal is the OS's, stood in for."""
    monkeypatch.setattr(cvtcl_eval.tempfile, "TemporaryFile", mock.Mock(side_effect=PermissionError(13, "Permission denied")))
    monkeypatch.setattr(cvtcl_eval, "extract_features", mock.Mock(side_effect=AssertionError("a pass ran")))
    out = paths["tmp"] / "read-only" / "eval-out"
    assert cvtcl_eval.cli(["retrieval", "--checkpoint", str(paths["rgb"]), *[a.format(**paths) for a in EVAL[:-1]],
                           str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write there (Permission denied); give a writable --out" in err, err
    assert not (paths["tmp"] / "read-only").exists()  # the folders made to try are gone


def test_results_a_full_disk_refuses_leave_no_empty_file_behind(paths, capsys, monkeypatch):
    """The result names were claimed (created empty) and stayed so when the write failed; the rerun
    then wrote -2 files beside them."""
    real = cvtcl_eval.report.write_results
    out = paths["tmp"] / "full-disk"

    def full(path, payload):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cvtcl_eval.report, "write_results", full)
    argv = ["retrieval", "--checkpoint", str(paths["rgb"]), *[a.format(**paths) for a in EVAL[:-1]], str(out)]
    assert cvtcl_eval.cli(argv) == 2
    err = capsys.readouterr().err
    assert "retrieval-neighbours-synthetic-split1.json (No space left on device); free space and rerun" in err, err
    assert not list(out.glob("*.json"))
    monkeypatch.setattr(cvtcl_eval.report, "write_results", real)
    assert cvtcl_eval.cli(argv) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["eval-retrieval-synthetic-split1.json",
                                                         "retrieval-neighbours-synthetic-split1.json"]


@pytest.mark.parametrize("splits, message", [
    ({"1": {"train": ["a", "b"], "test": []}}, "--split 1: D has 2 train and 0 test videos in it, and evaluation needs both"),
    ({"2": {"train": ["a"], "test": ["b"]}}, "--split 1: D has no such split; splits there: 2"),
])
def test_an_evaluation_split_without_test_videos_says_so(splits, message):
    """It said the split had no train and test videos, then listed that split among those there."""
    args = SimpleNamespace(dataset="synthetic", split="1", shards="D", protocol="retrieval")
    manifest = SimpleNamespace(dataset="synthetic", splits=splits, has_flow=False)
    with pytest.raises(errors.UsageError, match=message):
        cvtcl_eval.check_dataset(args, manifest, ["rgb"])


def test_retrieval_of_a_single_test_video_is_refused(paths):
    """Each set is centred by its own mean: one test video became all zeros, every similarity 0, and
    R@k (100 for rgb, flow and two-stream alike, and the kNN monitor's at every epoch) a function
    of the gallery's order. The linear probe scores one video as well as many."""
    one = {"1": {"train": ["a", "b", "c"], "test": ["d"]}}
    manifest = SimpleNamespace(dataset="synthetic", splits=one, has_flow=False)
    args = SimpleNamespace(dataset="synthetic", split="1", shards="D", protocol="retrieval")
    with pytest.raises(errors.UsageError, match="--split 1 of D has 1 test video: retrieval centres each set"):
        cvtcl_eval.check_dataset(args, manifest, ["rgb"])
    cvtcl_eval.check_dataset(SimpleNamespace(**{**vars(args), "protocol": "linear"}), manifest, ["rgb"])
    with pytest.raises(ValueError, match="1 test video and 1 train video: retrieval centres"):
        centred_cosine(torch.randn(1, 8), torch.randn(1, 8))
    # the trainer's kNN monitor: a real dataset whose split 1 tests one video
    data = paths["tmp"] / "one-test"
    shutil.copytree(paths["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["1"]["test"] = manifest["splits"]["1"]["test"][:1]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="run.knn_every=1: split 1 of .* has 1 test video: retrieval centres"):
        train.main([*[a.format(**paths) for a in TRAIN], f"data.root={data}", "run.knn_every=1"],
                   build_loader=_never_called)


def test_a_dataset_being_packed_is_named_as_that(paths, capsys):
    """While cvtcl-preprocess wrote a dataset (a rerun redoing shards), training and evaluation called
    its shards missing and said to rerun the pack, and verify listed them as problems and said the
    same: the running pack refused that rerun. Each now says who writes it."""
    data = paths["data"]
    with lock_held_elsewhere(data / ".lock"):
        assert train.cli([a.format(**paths) for a in TRAIN], build_loader=_never_called) == 2
        assert f"{data} is being written by cvtcl-preprocess (pid 4242): wait for it" in capsys.readouterr().err
        assert cvtcl_eval.cli(["retrieval", "--checkpoint", str(paths["rgb"]), *[a.format(**paths) for a in EVAL]]) == 2
        assert f"{data} is being written by cvtcl-preprocess (pid 4242)" in capsys.readouterr().err
        assert preprocess_cli.main(["verify", str(data)]) == 2
        assert f"{data} is being written by cvtcl-preprocess (pid 4242)" in capsys.readouterr().err
    assert preprocess_cli.main(["verify", str(data)]) == 0  # the lock released: what it was before


def test_a_fine_tune_of_a_run_still_training_says_its_checkpoint_may_go(tmp_path, capsys):
    """A fine-tune resumes only while its checkpoint is where it was, and a run still training deletes
    its old ones (run.keep_checkpoints): the resume file was left orphaned, hours lost."""
    run = tmp_path / "run"
    run.mkdir()
    with lock_held_elsewhere(run / ".lock"):
        cvtcl_eval.say_if_still_training(run / "checkpoint-00000009.pt")
    assert capsys.readouterr().out == (
        f"note: {run} is still training (pid 4242) and may delete checkpoint-00000009.pt (run.keep_checkpoints); an "
        "interrupted fine-tune resumes only while that file is there: copy it elsewhere first to be safe\n")
    cvtcl_eval.say_if_still_training(run / "checkpoint-00000009.pt")  # the run ended: nothing to say
    assert capsys.readouterr().out == ""


def test_a_strided_checkpoint_is_not_evaluated_on_consecutive_frames(paths):
    """Evaluation (and the trainer's kNN monitor) read consecutive frames: a checkpoint trained on
    every 2nd frame was evaluated on windows of half its time span, silently."""
    args = SimpleNamespace(frames_per_clip=None, crop_size=None, window_stride=None, backbone=None)
    with pytest.raises(errors.UsageError, match=r"trained on frames 2 apart \(data.frame_stride=2\)"):
        cvtcl_eval.clip_shape(args, [{"data": {"frame_stride": 2, "frames_per_clip": 8}}], {})
    with pytest.raises(ValueError, match="run.knn_every=1 with data.frame_stride=2: the kNN monitor"):
        train.main([*[a.format(**paths) for a in TRAIN], "data.frame_stride=2", "run.knn_every=1"],
                   build_loader=_never_called)


def test_without_dali_the_dali_loader_is_one_line_before_any_work(paths, capsys, monkeypatch):
    """hardware.md's legacy installs have no DALI: training and evaluation printed a traceback
    (exit 1), the trainer after writing its run directory. Both name the setting to change."""
    from cvtcl import preflight

    monkeypatch.setattr(preflight, "dali_installed", lambda: False)
    out = paths["tmp"] / "no-dali"
    assert train.cli([*[a.format(**paths) for a in TRAIN], f"run.out_dir={out}", "data.backend=dali"],
                     build_loader=_never_called) == 2
    assert "data.backend=dali needs the nvidia-dali-cuda130 package, which is not installed here" in \
        capsys.readouterr().err and not out.exists()
    assert cvtcl_eval.cli(["retrieval", "--checkpoint", str(paths["rgb"]), *[a.format(**paths) for a in EVAL],
                           "--backend", "dali"]) == 2
    assert "--backend dali needs the nvidia-dali-cuda130 package" in capsys.readouterr().err


def test_srun_tasks_without_torchrun_are_refused(paths, capsys, monkeypatch):
    """`srun -n 2 python -m cvtcl.train`: each task trained alone at a lower global batch, and the
    other was told the directory was "in use by another run". One line names the launch to use."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert train.cli([*[a.format(**paths) for a in TRAIN]], build_loader=_never_called) == 2
    assert "SLURM started 2 tasks of this command (SLURM_STEP_NUM_TASKS), not torchrun" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task (or torchrun's, which set WORLD_SIZE): as before
    from cvtcl.distributed import env_world
    assert env_world() == (0, 0, 1)
