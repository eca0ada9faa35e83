"""The synthetic generator: UCF101 layout, group-disjoint splits, determinism, and the motion
properties the demo relies on (same mean speed for every class, flip-symmetric directions)."""

import numpy as np
import pytest

from preprocess.datasets import index_ucf101
from preprocess.synthetic import PROFILES, SyntheticConfig, generate_raw, motion_path, split_test_groups
from preprocess.video import read_video

SMALL = dict(classes=3, videos_per_class=5, clips_per_group=2, frames=6, height=32, width=40)


def test_layout_and_group_disjoint_splits(tmp_path):
    config = SyntheticConfig(**SMALL)
    raw = generate_raw(config, tmp_path / "raw")
    assert (raw / "ucfTrainTestlist" / "classInd.txt").read_text().splitlines() == [
        "1 ConstantSpeed", "2 MoveThenReverse", "3 Accelerate"]
    index = index_ucf101(raw)
    assert len(index.videos) == 15
    assert sorted({v.name for v in index.videos if v.class_name == "Accelerate"}) == [
        "v_Accelerate_g01_c01", "v_Accelerate_g01_c02", "v_Accelerate_g02_c01", "v_Accelerate_g02_c02",
        "v_Accelerate_g03_c01"]
    groups = {v.name: v.group for v in index.videos}
    # 3 groups per class, 1 test group per split: splits 1..3 test groups 1, 2, 3
    assert sorted(index.splits) == ["1", "2", "3"]
    for k, subsets in index.splits.items():
        test_groups = {groups[n] for n in subsets["test"]}
        assert test_groups == {f"{c}_g0{k}" for c in config.class_names}
        assert not test_groups & {groups[n] for n in subsets["train"]}
        assert len(subsets["train"]) + len(subsets["test"]) == 15
    assert read_video(index.videos[0].path).frames.shape == (6, 32, 40, 3)


def test_ucf101_test_group_rule_scales():
    assert split_test_groups(SyntheticConfig(videos_per_class=100, clips_per_group=4))["1"] == range(1, 8)
    assert split_test_groups(SyntheticConfig(videos_per_class=40, clips_per_group=4)) == {
        "1": range(1, 4), "2": range(4, 7), "3": range(7, 10)}
    assert list(split_test_groups(SyntheticConfig(videos_per_class=8, clips_per_group=2, test_groups=2))) == ["1", "2"]
    with pytest.raises(ValueError, match="test-groups"):
        SyntheticConfig(videos_per_class=4, clips_per_group=2, test_groups=2)


@pytest.mark.parametrize("flag, value", [("fps", 0.0), ("fps", -1.0), ("fps", float("nan")), ("seed", -1)])
def test_refuses_a_frame_rate_or_seed_it_cannot_use(flag, value):
    """Before: OpenCV refused the writer ("is the folder writable?", exit 1) or numpy the seed."""
    with pytest.raises(ValueError, match=f"--{flag} must be"):
        SyntheticConfig(**{flag: value})


def test_deterministic_for_a_seed_and_refuses_other_parameters(tmp_path):
    def frames(seed, where):
        raw = generate_raw(SyntheticConfig(**SMALL, seed=seed), tmp_path / where)
        return np.stack([read_video(v.path).frames for v in index_ucf101(raw).videos])

    same = frames(0, "a")
    assert np.array_equal(same, frames(0, "b"))
    assert not np.array_equal(same, frames(1, "c"))
    with pytest.raises(ValueError, match="other parameters"):
        generate_raw(SyntheticConfig(**SMALL, seed=1), tmp_path / "a")


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_has_mean_speed_one_and_uniform_direction(name):
    speeds, angles = [], []
    for seed in range(200):
        path = motion_path(PROFILES[name], 24, np.random.default_rng(seed))
        step = np.diff(path, axis=0)
        speeds.append(np.linalg.norm(step, axis=1).mean())
        angles.append(np.arctan2(step[0, 1], step[0, 0]))
    # same mean speed for every class: speed is not a shortcut to the class
    assert np.allclose(speeds, 1.0, atol=1e-6)
    # directions cover the circle evenly, so a horizontal flip maps the class onto itself
    left = np.mean(np.cos(angles) < 0)
    assert 0.4 < left < 0.6


def test_a_full_disk_while_generating_keeps_no_short_video(tmp_path):
    """OpenCV's video writer drops write errors: under a file-size limit (a full disk's stand-in)
    a short .avi was renamed into place, and every rerun kept it (packed as failed). Now the
    command stops naming the video, keeps no part of it, and a rerun finishes as an uninterrupted
    run would."""
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(out), "--classes", "2",
            "--videos-per-class", "4", "--clips-per-group", "2", "--frames", "12", "--height", "32", "--width", "40",
            "--flow", "none", "--workers", "1"]

    def limited():  # the limit's signal ignored: writes past it fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    # no bytecode written under the limit: a cut .pyc would break every later import of the module
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    failed = subprocess.run(argv, env=env, preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    assert ".avi: OpenCV wrote" in failed.stderr and "free space" in failed.stderr
    assert not list((out / "raw").rglob("*.avi")), "a short video, or its temporary, was kept"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "8 videos packed in 1 shard(s), 96 frames, 0 failed" in done.stderr, done.stderr
