"""Packing: synthetic -> shards -> read back; flow sign, magnitude and zero level; failed videos;
parameter changes refused; a SIGKILLed run resumed to the same bytes as an uninterrupted one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess.cli import main
from preprocess.datasets import index_ucf101
from preprocess.pack import PackOptions, pack
from preprocess.schema import dequantise_flow, load_manifest
from preprocess.shards import ShardReader
from preprocess.synthetic import Appearance, Layer, Motion, SyntheticConfig, generate_raw, render_clip, write_avi
from preprocess.video import read_video

ROOT = Path(__file__).resolve().parents[1]


def _decode(jpeg, flag=cv2.IMREAD_COLOR):
    return cv2.imdecode(np.asarray(jpeg), flag)


def test_synthetic_round_trip(synthetic_dataset):
    reader = ShardReader(synthetic_dataset)
    manifest = reader.manifest
    assert manifest.dataset == "synthetic" and manifest.failed == []
    assert manifest.classes == ["ConstantSpeed", "MoveThenReverse", "Accelerate"]
    assert len(reader.videos) == 12 and len(manifest.shards) == 3
    assert manifest.params["flow"]["backend"] == "opencv-tvl1" and "tau" in manifest.params["flow"]["params"]
    assert manifest.params["synthetic"]["classes"] == 3
    for video in reader.videos[::5]:
        source = read_video(synthetic_dataset / "raw" / "UCF-101" / video.class_name / f"{video.name}.avi")
        assert video.num_frames == len(source.frames) == 20 and video.fps == 25.0
        frames = [_decode(f) for f in reader.read_rgb(video, 0, video.num_frames)]
        assert all(f.shape == (32, 40, 3) for f in frames)
        assert np.abs(frames[3].astype(int) - source.frames[3]).mean() < 6  # JPEG q90 of the decoded .avi
        assert video.num_flow_frames == 19
        flow = reader.read_flow(video, 0, video.num_flow_frames)
        assert all(_decode(x, 0).shape == _decode(y, 0).shape == (32, 40) for x, y in flow)
        with pytest.raises(IndexError):
            reader.read_flow(video, 0, 20)
    test = ShardReader(synthetic_dataset, split="1", subset="test").videos
    train = ShardReader(synthetic_dataset, split="1", subset="train").videos
    assert len(test) == len(train) == 6 and not {v.group for v in test} & {v.group for v in train}


def _texture(rng, h, w, sigma):
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), sigma)
    noise = (noise - noise.min()) / np.ptp(noise) * 255
    return np.repeat(noise[..., None], 3, axis=2).astype(np.float32)


def _known_translation(root: Path, velocity, frames=8, h=48, w=64, size=16):
    """One clip in UCF layout: a textured square moving at `velocity` px/frame over a static
    textured background (no pan), the distractor parked in the top-left corner."""
    rng = np.random.default_rng(3)
    square = Layer(_texture(rng, size, size, 1.0), np.ones((size, size), np.float32))
    look = Appearance(_texture(rng, h, w, 2.0) * 0.5, square, Layer(np.zeros((2, 2, 3), np.float32), np.zeros((2, 2), np.float32)))
    start = np.array([w / 2 - size / 2, h / 2 - size / 2]) - np.array(velocity) * frames / 2
    motion = Motion(start + np.arange(frames)[:, None] * np.array(velocity), np.zeros((frames, 2)), np.zeros((frames, 2)))
    name = "v_Move_g01_c01"
    (root / "UCF-101" / "Move").mkdir(parents=True)
    write_avi(root / "UCF-101" / "Move" / f"{name}.avi", render_clip(look, motion), 25.0)
    (root / "ucfTrainTestlist").mkdir()
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 Move\n")
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text(f"Move/{name}.avi 1\n")
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text("")
    return motion.target


@pytest.mark.parametrize("velocity", [(1.5, 0.0), (0.0, -2.0)])
def test_known_translation_gives_flow_of_right_sign_and_magnitude(tmp_path, velocity):
    corners = _known_translation(tmp_path / "raw", velocity)
    pack(index_ucf101(tmp_path / "raw"), PackOptions(str(tmp_path / "out")))
    reader = ShardReader(tmp_path / "out")
    video = reader.videos[0]
    x, y = (_decode(p, 0) for p in reader.read_flow(video, 3, 1)[0])
    cx, cy = (corners[3] + 8).astype(int)  # the square's centre in frame 3
    centre = np.s_[cy - 4 : cy + 4, cx - 4 : cx + 4]
    measured = dequantise_flow(x[centre]).mean(), dequantise_flow(y[centre]).mean()
    assert measured == pytest.approx(velocity, abs=0.35)
    # static background far from the square's whole path: zero flow, stored as exactly 128
    far = np.ones(x.shape, bool)
    lo, hi = corners.min(0).astype(int) - 8, corners.max(0).astype(int) + 16 + 8
    far[max(lo[1], 0) : hi[1], max(lo[0], 0) : hi[0]] = False
    assert far.sum() > 500
    assert (x[far] == 128).mean() > 0.95 and (y[far] == 128).mean() > 0.95


def test_near_zero_flow_is_stored_as_128():
    from preprocess.schema import quantise_flow

    assert quantise_flow(np.array([-0.05, 0.0, 0.05, -0.1, 0.1])).tolist() == [128, 128, 128, 127, 128]


def _raw(tmp_path, **overrides):
    settings = dict(classes=2, videos_per_class=2, clips_per_group=1, frames=6, height=32, width=40)
    return generate_raw(SyntheticConfig(**{**settings, **overrides}), tmp_path / "raw")


def test_corrupt_and_empty_videos_are_recorded_not_fatal(tmp_path, capsys):
    raw = _raw(tmp_path)
    (raw / "UCF-101" / "Accelerate").mkdir()  # not in classInd: refused before any work
    (raw / "UCF-101" / "Accelerate" / "v_Accelerate_g01_c01.avi").write_bytes(b"")
    args = ["ucf101", "--root", str(raw), "--out", str(tmp_path / "out"), "--workers", "1", "--videos-per-shard", "2"]
    assert main(args) == 2 and "Accelerate" in capsys.readouterr().err
    (raw / "UCF-101" / "Accelerate" / "v_Accelerate_g01_c01.avi").unlink()
    (raw / "UCF-101" / "Accelerate").rmdir()

    (raw / "UCF-101" / "ConstantSpeed" / "v_ConstantSpeed_g03_c01.avi").write_bytes(b"")
    corrupt = raw / "UCF-101" / "MoveThenReverse" / "v_MoveThenReverse_g01_c01.avi"
    corrupt.write_bytes(corrupt.read_bytes()[:200] + bytes(4000))
    with open(raw / "ucfTrainTestlist" / "testlist01.txt", "a") as fh:
        fh.write("ConstantSpeed/v_ConstantSpeed_g03_c01.avi\r\n")
    capsys.readouterr()
    assert main(args) == 3  # some videos failed, the dataset was written
    err = capsys.readouterr().err
    # the progress line counts failures as processed, not as written: it once said '5/5 videos'
    # above a summary of 3 videos
    assert "shard-00002.h5 written: 5/5 videos processed (3 packed, 2 failed)" in err, err
    assert "3 videos packed in 3 shard(s)" in err and "2 failed" in err.splitlines()[-1], err
    # the shard that holds the failed videos' slots (name order, 2 a shard: they are the 3rd and 4th of 5)
    assert err.splitlines()[-2].endswith("a rerun keeps them failed: to pack them once fixed, delete shard-00001.h5 and rerun")
    manifest = load_manifest(tmp_path / "out")
    failed = {f.name: f.reason for f in manifest.failed}
    assert sorted(failed) == ["v_ConstantSpeed_g03_c01", "v_MoveThenReverse_g01_c01"]
    assert "empty" in failed["v_ConstantSpeed_g03_c01"]
    assert len(manifest.videos) == 3
    assert "v_ConstantSpeed_g03_c01" not in manifest.splits["1"]["test"]  # splits list packed videos only
    from preprocess.verify import verify

    assert verify(tmp_path / "out") == []

    # the same command again keeps every shard; other parameters are refused
    before = [(p.name, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out").glob("shard-*.h5"))]
    capsys.readouterr()
    assert main(args) == 3 and "kept 3 complete shard(s)" in capsys.readouterr().err
    assert before == [(p.name, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out").glob("shard-*.h5"))]
    assert main(args + ["--jpeg-quality", "80"]) == 2
    assert "jpeg_quality" in capsys.readouterr().err
    # fixed, and its shard deleted as the run said: the rerun packs it and keeps the other shards
    empty = raw / "UCF-101" / "ConstantSpeed" / "v_ConstantSpeed_g03_c01.avi"
    empty.write_bytes((raw / "UCF-101" / "ConstantSpeed" / "v_ConstantSpeed_g01_c01.avi").read_bytes())
    (tmp_path / "out" / "shard-00001.h5").unlink()
    assert main(args) == 3
    assert [f.name for f in load_manifest(tmp_path / "out").failed] == ["v_MoveThenReverse_g01_c01"]
    after = [(p.name, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out").glob("shard-*.h5"))]
    assert [before[0], before[2]] == [after[0], after[2]] and len(load_manifest(tmp_path / "out").videos) == 4
    params = tmp_path / "out" / "params.json"  # damaged outside the tool: named, not a bare JSON error
    params.write_text(params.read_text()[:30])
    assert main(args) == 2 and f"{params} is not valid JSON" in capsys.readouterr().err


def test_an_unreadable_source_video_is_named_as_one_to_read(tmp_path, capsys, monkeypatch):
    """OpenCV hides a file it may not read as "cannot open it as a video (corrupt ...)", recorded as
    failed and kept failed by every rerun; a folder it may not read was said as "cannot write to
    OUT". Now: one error naming the video to fix, finished shards kept, and the rerun completes.
    (CI runs as root, which mode bits do not stop: the OS's refusal is stood in for.)"""
    import builtins

    from preprocess import video

    raw = _raw(tmp_path)
    locked = raw / "UCF-101" / "MoveThenReverse" / "v_MoveThenReverse_g01_c01.avi"

    def guarded(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(video, "open", guarded, raising=False)
    args = ["ucf101", "--root", str(raw), "--out", str(tmp_path / "out"), "--workers", "1", "--videos-per-shard", "2",
            "--flow", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"cannot read {locked}: Permission denied; 1 finished shard(s) kept. Fix its permissions" in err, err
    monkeypatch.undo()
    assert main(args) == 0 and not load_manifest(tmp_path / "out").failed


def test_a_single_frame_video_fails_where_flow_is_packed(tmp_path, capsys):
    """It was packed with no flow frame, and flow training crashed on it at a random step."""
    raw = _raw(tmp_path)
    video = raw / "UCF-101" / "ConstantSpeed" / "v_ConstantSpeed_g01_c01.avi"
    ok, frame = cv2.VideoCapture(str(video)).read()
    assert ok
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, frame.shape[1::-1])
    writer.write(frame)
    writer.release()
    common = ["--root", str(raw), "--workers", "1"]
    assert main(["ucf101", *common, "--out", str(tmp_path / "flow"), "--flow", "tvl1"]) == 3
    failed = {f.name: f.reason for f in load_manifest(tmp_path / "flow").failed}
    assert failed == {"v_ConstantSpeed_g01_c01": f"{video}: a single frame decoded, so it has no optical flow "
                                                 "(flow needs two)"}
    assert main(["ucf101", *common, "--out", str(tmp_path / "rgb"), "--flow", "none"]) == 0  # rgb needs one
    assert {v.name: v.num_frames for v in load_manifest(tmp_path / "rgb").videos}["v_ConstantSpeed_g01_c01"] == 1


def test_unusable_output_is_refused_before_any_work(tmp_path, capsys):
    raw = _raw(tmp_path, frames=4)
    (tmp_path / "file").write_text("not a directory")
    assert main(["ucf101", "--root", str(raw), "--out", str(tmp_path / "file" / "out")]) == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


def test_a_moved_synthetic_output_reruns_in_place_and_keeps_its_identity(tmp_path, capsys):
    """The synthetic dataset's source is its own OUT/raw: moved (`make demo`'s folder, say) and run
    again there, it is resumed, not refused for another source folder, and its manifest's digest
    (what a training checkpoint records) is unchanged. Parts are not offered for it."""
    import shutil

    from preprocess.schema import manifest_digest

    argv = ["--classes", "2", "--videos-per-class", "4", "--clips-per-group", "2", "--frames", "6", "--height",
            "16", "--width", "16", "--flow", "none", "--workers", "1"]
    assert main(["synthetic", "--out", str(tmp_path / "a"), *argv]) == 0
    digest = manifest_digest(tmp_path / "a")
    moved = shutil.move(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["synthetic", "--out", str(moved), *argv]) == 0
    assert "packing 0 video(s)" in capsys.readouterr().err
    assert load_manifest(moved).params["source_root"] == str(Path(moved, "raw").resolve())
    assert manifest_digest(moved) == digest
    with pytest.raises(SystemExit) as exit_status:
        main(["synthetic", "--out", str(tmp_path / "c"), "--part", "0/2", *argv])
    assert exit_status.value.code == 2 and "unrecognized arguments: --part" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: spawned workers still importing printed a
    KeyboardInterrupt traceback each above the command's own line. They ignore it now, and the
    command stops them."""
    from processes import children, command_line

    raw = _raw(tmp_path, videos_per_class=4, clips_per_group=2)
    argv, env = _preprocess("ucf101", "--root", raw, "--out", tmp_path / "out", "--workers", "2", "--flow", "none")
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while sum("multiprocessing.spawn" in command_line(c) for c in children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.005)
    time.sleep(0.05)  # past the moment the command starts them, while they import (~0.3 s)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to every process of the group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].endswith("interrupted (Ctrl-C); finished shards are kept, rerun the same "
                                                 "command to resume")


def test_own_mp4_videos_packed_in_the_hmdb51_layout(tmp_path):
    """README's "Your own videos": any container OpenCV reads, in HMDB51's layout, packs."""
    rng = np.random.default_rng(0)
    root, splits = tmp_path / "mine", tmp_path / "splits"
    splits.mkdir()
    for class_name in ("jump", "run"):
        lines = []
        (root / class_name).mkdir(parents=True)
        for i in range(2):
            write_avi(root / class_name / f"{class_name}_{i}.mp4", rng.integers(0, 255, (6, 32, 40, 3), np.uint8), 25.0,
                      fourcc="mp4v")
            lines.append(f"{class_name}_{i}.mp4 {i + 1}")
        (splits / f"{class_name}_test_split1.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["hmdb51", "--root", str(root), "--splits", str(splits), "--out", str(out), "--workers", "1",
                 "--flow", "none"]) == 0
    manifest = load_manifest(out)
    assert manifest.classes == ["jump", "run"] and [v.num_frames for v in manifest.videos] == [6, 6, 6, 6]
    assert manifest.splits["1"] == {"train": ["jump_0", "run_0"], "test": ["jump_1", "run_1"]}


def _preprocess(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [sys.executable, "-m", "preprocess", *map(str, args)], env


@pytest.mark.multiprocess
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    raw = _raw(tmp_path, videos_per_class=4, clips_per_group=2, frames=10)
    common = ["--root", raw, "--workers", "2", "--videos-per-shard", "2"]
    cmd, env = _preprocess("ucf101", "--out", tmp_path / "whole", *common)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _preprocess("ucf101", "--out", tmp_path / "killed", *common)
    first = tmp_path / "killed" / "shard-00000.h5"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, no chance to clean up
    proc.wait()
    assert first.exists() and not (tmp_path / "killed" / "manifest.json").exists(), "the run was not cut short"
    kept = first.stat().st_mtime_ns
    # what a kill during a write leaves (a rerun has another pid: it never overwrote these)
    for name in (f"packed.json.{socket.gethostname()}-{proc.pid}.tmp", "shard-00004.h5.tmp"):
        (tmp_path / "killed" / name).write_bytes(b"half")

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert first.stat().st_mtime_ns == kept  # resumed, not redone
    whole, resumed = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "killed"))
    assert resumed == whole  # same shards (sha256 included), records, splits
    assert not list((tmp_path / "killed").glob("*.tmp"))
