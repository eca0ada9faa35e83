"""Fault injection: damaged bytes, torn checkpoints, killed processes, two writers, malformed
manifests, a full disk. Each test reproduces a trial that once failed (a damaged frame trained on
silently, a corrupt shard kept and laundered into the manifest, leaked DALI workers, resume
stopped by a torn checkpoint, two writers on one directory, the first metrics line after a resume
averaging fewer steps, crashes on malformed manifests, 118 lines of HDF5 errors then a segfault on
a full disk) and checks the clear message and exit status that replaced it.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from cvtcl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from cvtcl.metrics import read_metrics
from cvtcl.train import main as train_main
from dali_pipelines.toy_shards import write_toy_dataset
from preprocess.hygiene import DirectoryBusyError, exclusive_dir
from preprocess.schema import LayoutError, load_manifest, manifest_path
from preprocess.shards import ShardReader
from preprocess.verify import verify
from processes import alive, descendants, reap_zombies
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread, smoke_args  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


# ---- damaged bytes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """8 videos of 8 frames (RGB + flow) in 2 shards: a clip of 8 frames reads a whole video and one
    epoch of batch 4 visits every video, so one epoch reads every frame and flow plane."""
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data", num_videos=8, num_frames=8, height=16,
                             width=24, num_static=0, videos_per_shard=4)


def _where(root: Path, shard: int, position: int) -> str | None:
    """'video NAME <plane> frame K' for a byte inside frame data, None for the shard's index."""
    path = root / f"shard-{shard:05d}.h5"
    videos = [v for v in load_manifest(root).videos if v.shard == shard]
    with h5py.File(path, "r") as h5:
        for modality in ("rgb", "flow"):
            data = h5[modality]["bytes"]
            start = data.id.get_offset()
            if start <= position < start + data.id.get_storage_size():
                entry = int(np.searchsorted(h5[modality]["offsets"][()], position - start, side="right")) - 1
                break
        else:
            return None
    for v in videos:
        if modality == "rgb" and v.rgb_start <= entry < v.rgb_start + v.num_frames:
            return f"video {v.name} rgb frame {entry - v.rgb_start} "
        if modality == "flow" and 2 * v.flow_start <= entry < 2 * (v.flow_start + v.num_flow_frames):
            return f"video {v.name} flow-{'xy'[entry % 2]} frame {entry // 2 - v.flow_start} "
    raise AssertionError(f"byte {position} of {path} belongs to no video")


def _flip(path: Path, position: int, rng: random.Random) -> None:
    with open(path, "r+b") as fh:
        fh.seek(position)
        old = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([old ^ rng.randrange(1, 256)]))


def _train_epoch(root: Path) -> Exception | None:
    """One epoch of the training loader (DALI, CPU, rgb + flow as stage 2 reads them); its error."""
    from cvtcl.data import build_pretrain_loader

    loader = build_pretrain_loader(root, modalities=("rgb", "flow"), batch_size=4, frames_per_clip=8,
                                   crop_size=16, num_workers=0, num_threads=1)
    try:
        for _ in loader.epoch(0):
            pass
    except (LayoutError, RuntimeError) as err:
        return err
    finally:
        loader.close()
    return None


def _flip_trials(toy, tmp_path, trials: int, seed: int) -> dict[str, int]:
    """Random single-byte flips anywhere in a shard: verify and one training epoch must report each,
    naming the video and frame when the byte is frame data, the shard's index otherwise. Returns
    how many flips hit frame data and the index."""
    rng = random.Random(seed)
    missed, hits = [], {"frame": 0, "index": 0}
    for trial in range(trials):
        root = tmp_path / f"trial{trial}"
        shutil.copytree(toy, root)
        shard = rng.randrange(2)
        path = root / f"shard-{shard:05d}.h5"
        position = rng.randrange(path.stat().st_size)
        where = _where(root, shard, position)
        _flip(path, position, rng)
        problems = verify(root)
        error = _train_epoch(root)
        named = where if where is not None else "index"
        hits["frame" if where else "index"] += 1
        if not any(path.name in p and named in p + " " for p in problems):
            missed.append(f"verify, byte {position} of {path.name} ({where}): {problems}")
        if error is None or named not in str(error) + " ":
            missed.append(f"training, byte {position} of {path.name} ({where}): {error!r}")
        shutil.rmtree(root)
    assert not missed, "\n".join(missed)
    return hits


def test_random_byte_flips_are_reported_by_verify_and_training(toy, tmp_path):
    _flip_trials(toy, tmp_path, trials=6, seed=1)


@pytest.mark.slow
def test_thirty_two_random_byte_flips(toy, tmp_path):
    hits = _flip_trials(toy, tmp_path, trials=32, seed=2)
    assert hits["frame"] and hits["index"], hits  # both kinds of damage were tried
    print(f"32 flips: {hits}")


def test_flip_inside_a_frame_is_named_by_every_reader(toy, tmp_path):
    """24 of 30 flips inside a frame's entropy-coded data used to decode: trained on silently."""
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    video = load_manifest(root).videos[5]  # shard 1
    with h5py.File(root / "shard-00001.h5", "r") as h5:
        start = h5["rgb"]["bytes"].id.get_offset()
        lo, hi = h5["rgb"]["offsets"][video.rgb_start + 3 : video.rgb_start + 5]
    _flip(root / "shard-00001.h5", int(start + (lo + hi) // 2), random.Random(0))
    expected = f"video {video.name} rgb frame 3 (shard 1) fails its checksum"
    reader = ShardReader(root)
    with pytest.raises(LayoutError, match=re.escape(expected)):
        reader.read_rgb(video, 0, 8)
    assert reader.read_rgb(video, 4, 4)  # the frames around it still read
    from cvtcl.data import build_pretrain_loader

    for backend in ("dali", "baseline"):
        loader = build_pretrain_loader(root, batch_size=4, frames_per_clip=8, crop_size=16, num_workers=0,
                                       backend=backend)
        with pytest.raises((LayoutError, RuntimeError), match=re.escape(expected)):
            for _ in loader.epoch(0):
                pass


def test_version_1_shards_are_refused_with_what_to_do(toy, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    data = json.loads(manifest_path(root).read_text())
    manifest_path(root).write_text(json.dumps(data | {"layout_version": 1}))
    with pytest.raises(LayoutError, match="version 1 .no per-frame checksums.*Re-run the same `cvtcl-preprocess`"):
        ShardReader(root)
    assert "version 1" in verify(root)[0]


# ---- malformed manifests -----------------------------------------------------------------------

def _edit_first_video(key, value):
    def edit(data):
        data["videos"][0][key] = value
    return edit


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.clear() or d.update({"layout_version": 2}), "'dataset'"),
    (lambda d: d.update(videos=None), "'videos' is NoneType"),
    (lambda d: d["shards"][0].pop("sha256"), r"'shards\[0\].sha256' is missing"),
    (lambda d: d["shards"][1].update(num_frames="many"), r"'shards\[1\].num_frames' is str"),
    (lambda d: d["shards"][0].update(data_regions=[[1]]), r"shards\[0\].data_regions"),
    (lambda d: d.update(splits=[]), "'splits' is list"),
    (lambda d: d["videos"][0].pop("label"), "misses field 'label'"),
    (lambda d: d["videos"][2].update(num_frames=None), r"videos\[v_\w+\].num_frames' is NoneType"),
])
def test_malformed_manifest_is_one_problem_naming_file_and_field(toy, tmp_path, edit, field):
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    data = json.loads(manifest_path(root).read_text())
    edit(data)
    manifest_path(root).write_text(json.dumps(data))
    problems = verify(root)
    assert len(problems) == 1 and "manifest.json" in problems[0], problems
    assert re.search(field, problems[0]), problems
    with pytest.raises(LayoutError, match=field):
        ShardReader(root)


def test_top_level_list_manifest(tmp_path):
    manifest_path(tmp_path).write_text("[]")
    problems = verify(tmp_path)
    assert len(problems) == 1 and "manifest.json" in problems[0] and "expected dict" in problems[0]


@pytest.mark.parametrize("key,value,field", [
    ("num_frames", 7, "num_frames=7"),
    ("rgb_start", 1, "rgb_start=1"),
    ("flow_start", 3, "flow_start=3"),
])
def test_edited_counts_and_offsets_are_cross_checked_against_the_shard(toy, tmp_path, key, value, field):
    """Training on an edited num_frames/offset used to read shifted frames and exit 0."""
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    data = json.loads(manifest_path(root).read_text())
    name = data["videos"][0]["name"]
    data["videos"][0][key] = value
    manifest_path(root).write_text(json.dumps(data))
    assert any(f"video {name}: manifest {field}" in p for p in verify(root))
    reader = ShardReader(root)
    with pytest.raises(LayoutError, match=f"disagree: video {name}: manifest {field}"):
        reader.read_rgb(reader.videos[0], 0, 1)
    assert f"disagree: video {name}: manifest {field}" in str(_train_epoch(root))


# ---- preprocessing reruns, two writers, full disk ----------------------------------------------

def _pack_command(raw, out, *extra):
    return [sys.executable, "-m", "preprocess", "ucf101", "--root", str(raw), "--out", str(out), "--flow", "none",
            "--videos-per-shard", "3", "--workers", "1", *extra]


def test_rerun_rebuilds_a_damaged_shard_instead_of_keeping_it(synthetic_dataset, tmp_path):
    """A damaged complete shard was kept after a header check and its new sha256 recorded."""
    out = tmp_path / "out"
    first = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    shard = out / "shard-00002.h5"
    sound = shard.read_bytes()
    _flip(shard, len(sound) * 3 // 4, random.Random(0))
    assert verify(out)
    again = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "shard-00002.h5: sha256 differs from the one recorded" in again.stderr and "rebuilding" in again.stderr
    assert shard.read_bytes() == sound and verify(out) == []


def test_a_filesystem_without_locks_is_worked_on_and_said(tmp_path, capsys, monkeypatch):
    """Lustre mounted without flock answers ENOSYS: every command stopped there with a bare
    "Function not implemented". It works on, saying once that a second writer would not be stopped."""
    import errno

    from preprocess import hygiene

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(hygiene.fcntl, "flock", no_locks)
    monkeypatch.setattr(hygiene, "_no_locks_said", [])
    for _ in range(2):  # a schedule locks each sub-stage's directory: said once
        with exclusive_dir(tmp_path / "out", "test run"):
            (tmp_path / "out" / "work").write_text("done")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: the filesystem takes no file locks (Function not implemented), so a second test " \
           "run there would not be stopped" in err and err.count("note:") == 1
    monkeypatch.setattr(hygiene.fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(hygiene.OutputDirError, match="cannot write to the output directory"):  # another failure
        with exclusive_dir(tmp_path / "other", "test run"):
            pass


def test_second_writer_gets_a_clear_message_and_exit_2(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    with exclusive_dir(out, "test"):
        pack = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
        run = subprocess.run([sys.executable, "-m", "cvtcl.train", "--preset", "smoke",
                              f"data.root={synthetic_dataset}", f"run.out_dir={out}"],
                             env=_env(), capture_output=True, text=True, cwd=ROOT)
    for done in (pack, run):
        assert done.returncode == 2, done.stderr
        assert f"{out} is in use by another" in done.stderr and f"(pid {os.getpid()})" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(out.glob("shard-*"))


def test_parts_share_the_output_but_not_a_part(synthetic_dataset, tmp_path):
    from preprocess.pack import locked_out

    out, raw = tmp_path / "out", synthetic_dataset / "raw"
    with locked_out(out, "parts/.lock-part-00000-of-00002"):  # as part 0/2 holds them
        same = subprocess.run(_pack_command(raw, out, "--part", "0/2"), env=_env(), capture_output=True, text=True)
        whole = subprocess.run(_pack_command(raw, out), env=_env(), capture_output=True, text=True)
        other = subprocess.run(_pack_command(raw, out, "--part", "1/2"), env=_env(), capture_output=True, text=True)
    assert same.returncode == 2 and "in use by another cvtcl-preprocess run of this part" in same.stderr
    assert whole.returncode == 2 and f"{out} is in use by another cvtcl-preprocess run" in whole.stderr
    assert other.returncode == 0, other.stderr
    assert (out / "parts" / "packed-part-00001-of-00002.json").is_file()


def test_lock_of_a_killed_process_is_not_held(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from preprocess.hygiene import exclusive_dir\n"
                               f"with exclusive_dir({str(tmp_path)!r}, 'x'):\n print('held', flush=True); time.sleep(60)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryBusyError, match=f"pid {holder.pid}"):
        with exclusive_dir(tmp_path, "test"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_dir(tmp_path, "test"):  # the kernel released the dead holder's flock
        pass


@pytest.fixture
def small_disk(tmp_path):
    """A 150 kB tmpfs (two of the 66 kB shards fit) (needs root, as in CI); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(mount)],
                                                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?): the full-disk trial needs one")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_error_then_the_rerun_resumes(synthetic_dataset, small_disk):
    """A full disk while packing was 118 lines of HDF5 errors and a segfault."""
    out = small_disk / "out"
    full = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
    assert full.returncode == 2, full.stderr
    error = [line for line in full.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "No space left on device" in error[0] and "rerun the same command" in error[0]
    assert "Traceback" not in full.stderr and "HDF5" not in full.stderr
    kept = json.loads((out / "packed.json").read_text())
    assert kept and not list(out.glob("*.tmp"))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in kept}
    # not a byte left: the rerun's first write is its lock's pid, an OSError that names no file
    filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    for chunk in (65536, 4096, 1):
        try:
            while os.write(filler, b"\0" * chunk):
                pass
        except OSError:
            pass
    os.close(filler)
    stuck = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
    assert stuck.returncode == 2, stuck.stderr
    assert stuck.stderr.strip().endswith(f"cannot write to the output directory {out}: No space left on device")
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    again = subprocess.run(_pack_command(synthetic_dataset / "raw", out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == mtimes  # finished shards kept
    assert verify(out) == []


def test_checkpoint_write_failure_keeps_the_previous_ones(tmp_path, monkeypatch):
    import cvtcl.checkpoint as checkpoint

    state = {"step": 1, "model": {}}
    checkpoint.save_checkpoint(tmp_path, state)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"checkpoint-00000002.pt .No space left.*\d GiB free"):
        checkpoint.save_checkpoint(tmp_path, {**state, "step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001.pt"]
    # the disk has room (this one has more than a GiB, as the test machines do): another limit
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=50 * 2**30))
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"50.00 GiB free there; with that much room, a "
                                                              r"file-size limit \(ulimit -f\) or a quota\?\)"):
        checkpoint.save_checkpoint(tmp_path, {**state, "step": 2})

    def interrupted(*args, **kwargs):  # not the disk: the message says what it was, not just its type
        raise RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated. ")

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"\(RuntimeError: DataLoader worker \(pid 7\) is killed"):
        checkpoint.save_checkpoint(tmp_path, {**state, "step": 2})


# ---- training: torn checkpoints, metrics after resume, killed trainers -------------------------

@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fake") / "data")


_train_args = smoke_args


def test_resume_skips_a_torn_checkpoint_and_names_it(fake_data, tmp_path, capsys):
    """A torn newest checkpoint stopped resume with "failed finding central directory", no file named."""
    out = tmp_path / "run"
    args = ("run.checkpoint_every=2", "run.keep_checkpoints=0", "run.log_every=1")
    assert train_main(_train_args(fake_data, out, "run.max_steps=4", *args), build_loader=FakePretrainLoader) == 0
    torn = latest_checkpoint(out)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    # what kills during writes leave: a checkpoint of a step the run will not save again (a SIGTERM's),
    # a JSON of a writer that is gone; one whose writer is alive (an evaluation's) stays
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left = [out / "checkpoint-00000003.pt.tmp", out / f"config.json.{host}-{int(gone.stdout)}.tmp"]
    alive = out / f"eval-retrieval.json.{host}-{os.getpid()}.tmp"
    for path in (*left, alive):
        path.write_bytes(b"half")
    capsys.readouterr()
    assert train_main(_train_args(fake_data, out, "run.max_steps=6", *args), build_loader=FakePretrainLoader) == 0
    assert not any(path.exists() for path in left) and alive.exists()
    printed = capsys.readouterr().out
    assert f"checkpoint {torn} cannot be loaded (RuntimeError: " in printed and "skipped" in printed
    assert "(step 2, " in printed
    assert load_checkpoint(latest_checkpoint(out))["step"] == 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
    for path in list_checkpoints(out):  # none loads: refused, not silently started over
        path.write_bytes(b"torn")
    with pytest.raises(ValueError, match=f"no checkpoint in {out} loads .checkpoint .* cannot be loaded.*move them away"):
        train_main(_train_args(fake_data, out, "run.max_steps=8", *args), build_loader=FakePretrainLoader)


def _flip_a_bit_of_a_weight(checkpoint: Path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes (a zip member) of `checkpoint`."""
    import struct
    import zipfile

    with zipfile.ZipFile(checkpoint) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    content = bytearray(checkpoint.read_bytes())
    name_length, extra_length = struct.unpack("<HH", content[member.header_offset + 26: member.header_offset + 30])
    content[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x40
    checkpoint.write_bytes(bytes(content))
    return member.filename


def test_resume_skips_a_checkpoint_with_a_flipped_bit_and_names_it(fake_data, tmp_path, capsys):
    """torch.load does not check its zip's CRCs: a weight changed by up to 5e36 loaded silently and trained on."""
    out = tmp_path / "run"
    args = ("run.checkpoint_every=2", "run.keep_checkpoints=0", "run.log_every=1")
    assert train_main(_train_args(fake_data, out, "run.max_steps=4", *args), build_loader=FakePretrainLoader) == 0
    damaged = latest_checkpoint(out)
    member = _flip_a_bit_of_a_weight(damaged)
    capsys.readouterr()
    assert train_main(_train_args(fake_data, out, "run.max_steps=6", *args), build_loader=FakePretrainLoader) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint {damaged} cannot be loaded ({member} fails its CRC-32: the file is damaged): skipped" in printed
    assert "(step 2, " in printed and load_checkpoint(latest_checkpoint(out))["step"] == 6


class _Killed(Exception):
    pass


class _DiesAtStepSeven(FakePretrainLoader):
    """The fake loader, killed (an exception, like SIGKILL: no last log line) as step 7 starts."""

    def epoch(self, epoch, start_step=0):
        for step, batch in enumerate(super().epoch(epoch, start_step), start_step):
            if epoch * self.steps_per_epoch + step == 6:
                raise _Killed
            yield batch


def test_metrics_window_after_resume_equals_the_uninterrupted_run(fake_data, tmp_path):
    """Killed after the step-6 checkpoint with log_every=4: the resumed run's step-8 line must
    average steps 5..8 as the uninterrupted run's does, not 7..8."""
    common = ("run.max_steps=8", "run.log_every=4", "run.checkpoint_every=2", "run.keep_checkpoints=0")
    assert train_main(_train_args(fake_data, tmp_path / "whole", *common), build_loader=FakePretrainLoader) == 0
    with pytest.raises(_Killed):
        train_main(_train_args(fake_data, tmp_path / "split", *common), build_loader=_DiesAtStepSeven)
    assert load_checkpoint(latest_checkpoint(tmp_path / "split"))["step"] == 6
    assert train_main(_train_args(fake_data, tmp_path / "split", *common), build_loader=FakePretrainLoader) == 0
    whole, split = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("whole", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in whole] == [4, 8]
    for name in ("loss", "loss_instance", "top1_instance"):
        assert split[1][name] == pytest.approx(whole[1][name], rel=1e-6), name


def test_metrics_window_after_a_max_steps_stop_equals_the_uninterrupted_run(fake_data, tmp_path):
    """Stopped by run.max_steps=3 (a line at step 3), then resumed to 8 with log_every=4: the step-4
    line averages steps 1..4 as the uninterrupted run's does, not step 4 alone."""
    common = ("run.log_every=4", "run.keep_checkpoints=0")
    assert train_main(_train_args(fake_data, tmp_path / "whole", "run.max_steps=8", *common),
                      build_loader=FakePretrainLoader) == 0
    assert train_main(_train_args(fake_data, tmp_path / "split", "run.max_steps=3", *common),
                      build_loader=FakePretrainLoader) == 0
    assert train_main(_train_args(fake_data, tmp_path / "split", "run.max_steps=8", *common),
                      build_loader=FakePretrainLoader) == 0
    whole, split = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("whole", "split"))
    assert [r["step"] for r in split] == [3, 4, 8] and [r["step"] for r in whole] == [4, 8]
    for name in ("loss", "loss_instance", "top1_instance"):
        assert split[1][name] == pytest.approx(whole[0][name], rel=1e-6), name


@pytest.mark.multiprocess
def test_sigkilled_trainer_leaves_no_process_behind(synthetic_dataset, tmp_path):
    """A killed trainer's DALI workers (~0.45 GB each, deaf to SIGTERM) used to run until reboot."""
    command = [sys.executable, "-m", "cvtcl.train", "--preset", "smoke", f"data.root={synthetic_dataset}",
               f"run.out_dir={tmp_path}", "optim.epochs=1000", "run.progress=plain", "loss.queue_size=8"]
    trainer = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not read_metrics(tmp_path / "metrics.jsonl"):  # workers are up once a step is logged
        assert trainer.poll() is None, trainer.stdout.read()
        assert time.time() < deadline, "timed out waiting for the first logged step"
        time.sleep(0.1)
    workers = descendants(trainer.pid)
    assert len(workers) >= 2  # DALI's parallel source workers (data.num_workers defaults to 2)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 20
    while [p for p in workers if alive(p)] and time.time() < deadline:
        time.sleep(0.1)
    survivors = [p for p in workers if alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    reap_zombies()
    assert not survivors, f"{len(survivors)} of the trainer's {len(workers)} children outlived it"


def test_baseline_loader_workers_leave_the_process_group():
    """Out of the trainer's process group, a SIGTERM to the group (torchrun's, a scheduler's) does not
    reach the DataLoader workers, which torch makes die of a SIGTERM their parent did not send."""
    from torch.utils.data import DataLoader, Dataset

    from dali_pipelines.baseline import _own_process_group

    class Groups(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return os.getpid(), os.getpgid(0)

    loader = DataLoader(Groups(), batch_size=2, num_workers=1, worker_init_fn=_own_process_group, timeout=60)
    pids, groups = (b.tolist() for b in next(iter(loader)))
    assert pids[0] != os.getpid() and groups == pids and groups[0] != os.getpgid(0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["baseline", "dali"])
def test_sigterm_to_the_process_group_still_checkpoints(synthetic_dataset, tmp_path, backend):
    """torchrun, like many schedulers, sends SIGTERM to the trainer's whole process group, its loader
    workers included: torch's DataLoader workers died of it, and the trainer with a RuntimeError
    before its checkpoint. The workers leave it to the trainer."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cvtcl.train", "--preset", "smoke", f"data.root={synthetic_dataset}",
               f"run.out_dir={out}", "optim.epochs=1000", "run.progress=plain", "loss.queue_size=8",
               "run.log_every=1", f"data.backend={backend}"]
    trainer = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        # a few steps logged, and the loader's workers up (the baseline's start anew each epoch)
        while len(read_metrics(out / "metrics.jsonl")) < 2 or not descendants(trainer.pid):
            assert trainer.poll() is None, trainer.stdout.read()
            assert time.time() < deadline, "timed out waiting for the logged steps"
            time.sleep(0.02)
        os.killpg(trainer.pid, signal.SIGTERM)
        assert trainer.wait(timeout=120) == 0, trainer.stdout.read()
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
    printed = trainer.stdout.read()
    step = load_checkpoint(latest_checkpoint(out))["step"]
    assert f"SIGTERM: checkpoint saved at step {step}; rerun the same command to resume" in printed, printed
    assert "Traceback" not in printed and "RuntimeError" not in printed, printed


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["baseline", "dali"])
def test_a_loader_worker_that_dies_ends_the_run_with_one_line(synthetic_dataset, tmp_path, backend):
    """A worker killed by the system (memory, a full /dev/shm): DALI's pool stopped the others
    with SIGTERM, which workers forked under the trainer's stop handlers ignored, and the trainer
    waited for them for good (a job held until its wall time). Now: exit 1 and one line naming
    /dev/shm, promptly."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cvtcl.train", "--preset", "smoke", f"data.root={synthetic_dataset}",
               f"run.out_dir={out}", "optim.epochs=1000", "run.progress=none", "loss.queue_size=8",
               f"data.backend={backend}"]
    trainer = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(workers := descendants(trainer.pid)) < 2 or not latest_checkpoint(out):  # training, workers up
            assert trainer.poll() is None, trainer.stdout.read()
            assert time.time() < deadline, "timed out waiting for the workers"
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # a baseline worker whose epoch just ended: see below
            os.kill(workers[-1], signal.SIGKILL)  # DALI's stay for the run: the others must end too
        # a baseline worker killed as its epoch ends has done its work, and training rightly goes on
        # (they start anew each epoch): kill the current one until one was busy
        killing = time.time() + 60
        while backend == "baseline" and trainer.poll() is None and time.time() < killing:
            time.sleep(0.5)
            for pid in descendants(trainer.pid)[-1:]:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
        status = trainer.wait(timeout=60)  # was: for good (DALI)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            for pid in descendants(trainer.pid):
                os.kill(pid, signal.SIGKILL)
            trainer.wait()
    printed = trainer.stdout.read()
    assert status == 1, printed
    assert "cvtcl.train: error: a loader worker process died at" in printed and "/dev/shm has" in printed, printed
    assert "Traceback" not in printed and len(printed.strip().splitlines()) == 1, printed


@pytest.mark.multiprocess
def test_sigterm_while_waiting_for_the_other_ranks_ends_the_rank(synthetic_dataset, tmp_path):
    """A rank whose rank 0 stopped before joining (at a busy run.out_dir) waits in
    init_process_group; torchrun's SIGTERM to it then only set the stop flag, and the rank hung on
    until torchrun's grace ran out. It joins before the stop handlers are in place, so it ends."""
    with socket.create_server(("127.0.0.1", 0)) as store:  # rank 0's store address, never answering
        env = {**_env(), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(store.getsockname()[1])}
        trainer = subprocess.Popen(
            [sys.executable, "-m", "cvtcl.train", "--preset", "smoke", f"data.root={synthetic_dataset}",
             f"run.out_dir={tmp_path / 'run'}", "data.batch_size=2", "loss.queue_size=4", "run.device=cpu"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            store.settimeout(240)
            connection, _ = store.accept()  # the rank is inside init_process_group, its checks passed
            trainer.send_signal(signal.SIGTERM)
            status = trainer.wait(timeout=60)
            connection.close()
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
    assert status == -signal.SIGTERM, trainer.stdout.read()


def test_damaged_frame_stops_training_naming_video_and_frame(synthetic_dataset, tmp_path):
    """The real trainer on the DALI CPU loader: exit 2 and one line naming video and frame."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root, ignore=shutil.ignore_patterns("raw", ".lock"))
    for shard in sorted(root.glob("shard-*.h5")):  # one byte in every RGB frame: any clip reads one
        with h5py.File(shard, "r") as h5:
            start, offsets = h5["rgb"]["bytes"].id.get_offset(), h5["rgb"]["offsets"][()]
        rng = random.Random(0)
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            _flip(shard, int(start + (lo + hi) // 2), rng)
    done = subprocess.run([sys.executable, "-m", "cvtcl.train", "--preset", "smoke", f"data.root={root}",
                           f"run.out_dir={tmp_path / 'run'}", "run.max_steps=2", "loss.queue_size=8"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(r"cvtcl.train: error: .*video v_\w+ rgb frame \d+ \(shard \d\) fails its checksum",
                                   done.stderr), done.stderr
    assert not list_checkpoints(tmp_path / "run")


def _death_signal(reader) -> int:
    """In a child: unpickle the reader if given (as DALI's spawned workers do), then report the
    signal the kernel sends this process when its parent dies (PR_GET_PDEATHSIG)."""
    import ctypes

    signal_number = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal_number), 0, 0, 0)
    return signal_number.value


@pytest.mark.multiprocess
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_children_of_a_reader_process_die_with_it(toy, start_method):
    """DALI forks its workers on CPU and spawns them on GPU; both must get PR_SET_PDEATHSIG."""
    import multiprocessing

    reader = ShardReader(toy)  # registers the at-fork hook in this process
    with multiprocessing.get_context(start_method).Pool(1) as pool:
        assert pool.apply(_death_signal, (reader,)) == signal.SIGKILL


def test_unwritable_run_directory_is_one_error_exit_2(fake_data, tmp_path, capsys):
    from cvtcl.train import cli

    (tmp_path / "file").write_text("in the way")
    status = cli(_train_args(fake_data, tmp_path / "file" / "run", "run.max_steps=1"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"cvtcl.train: error: run.out_dir={tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file" in err


def test_full_disk_while_training_is_one_error_exit_2(fake_data, small_disk, capsys):
    """Checkpoints or metrics that no longer fit: one line, exit 2, the earlier checkpoints kept."""
    from cvtcl.train import cli

    out = small_disk / "run"
    args = ("run.checkpoint_every=1", "run.keep_checkpoints=0", "run.log_every=1")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert cli(_train_args(fake_data, out, "run.max_steps=1", *args)) == 0
    used = shutil.disk_usage(small_disk).used
    size = latest_checkpoint(out).stat().st_size
    # room for about one more checkpoint: the resumed run writes step 2's, and step 3's does not fit
    subprocess.run(["mount", "-o", f"remount,size={(used + size * 3 // 2) // 1024 + 1}k", str(small_disk)], check=True)
    capsys.readouterr()
    status = cli(_train_args(fake_data, out, "run.max_steps=40", *args))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert re.search(r"cvtcl.train: error: cannot write (checkpoint .*GiB free there|.*No space left on device)", err)
    assert "rerun the same command to resume" in err
    assert len(list_checkpoints(out)) >= 2 and not list(out.glob("*.tmp"))
    assert load_checkpoint(latest_checkpoint(out))["step"] >= 2  # the last one written is whole


@pytest.mark.parametrize("name", ["metrics.jsonl", "launches.jsonl"])
def test_a_log_file_that_cannot_be_written_is_one_error_exit_2(fake_data, tmp_path, capsys, name):
    """metrics.jsonl's own error (exit 2, the file named) was replaced by a bare "No space left on
    device" (exit 1) when closing the file flushed the refused line again; launches.jsonl had none."""
    from cvtcl.train import cli

    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to("/dev/full")  # every write: ENOSPC
    status = cli(_train_args(fake_data, out, "run.max_steps=2", "run.log_every=1"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"cannot write {out / name} (No space left on device)" in err
