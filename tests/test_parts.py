"""Split runs: `--part I/N` in separate processes + `merge` equal one whole run byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kinetics_fakes import write_kinetics_tree
from preprocess.cli import main
from preprocess.parts import Part, marker_path, merge
from preprocess.pack import ConfigError
from preprocess.verify import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, message", [
    ("3/3", "0-based and must be 0..2"), ("-1/3", "0..2"), ("1/0", "N must be >= 1"), ("1", "expected I/N"),
    ("a/b", "expected I/N"),
])
def test_part_is_validated(text, message):
    with pytest.raises(ValueError, match=message):
        Part.parse(text)


def test_part_owns_a_stride_of_shards():
    parts = [Part.parse(f"{i}/3") for i in range(3)]
    owners = [[p.index for p in parts if p.owns(shard)] for shard in range(10)]
    assert owners == [[s % 3] for s in range(10)]  # each shard in exactly one part


def test_bad_part_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ucf101", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--part", "3/3"])
    assert exit_.value.code == 2 and "0-based" in capsys.readouterr().err


def _cli(*args):
    return [sys.executable, "-m", "preprocess", *map(str, args)]


@pytest.mark.multiprocess
def test_three_parts_and_merge_equal_one_run(tmp_path):
    root, annotations = write_kinetics_tree(tmp_path)
    common = ["kinetics400", "--root", root, "--annotations", annotations, "--workers", "1", "--videos-per-shard", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert subprocess.run(_cli(*common, "--out", whole), env=env, capture_output=True).returncode == 3

    # part 1 alone: merge refuses, naming the parts left; verify --part works before the merge
    first = subprocess.run(_cli(*common, "--out", split, "--part", "1/3"), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr  # shards 1, 4, 7 hold neither failed video
    with pytest.raises(ConfigError, match="part.s. 0/3, 2/3 not complete"):
        merge(split)
    assert verify(split, part=Part(1, 3)) == []
    assert "part 0/3 is not complete" in verify(split, part=Part(0, 3))[0]
    marker = marker_path(split, Part(1, 3))
    intact = marker.read_bytes()
    marker.write_bytes(intact[:50])  # damaged outside the tool: a problem found (exit 1), naming it
    (problem,) = verify(split, part=Part(1, 3))
    assert problem.startswith(f"{marker} is not valid JSON") and problem.endswith(
        "delete it and rerun part 1/3 with the same command (its finished shards are kept)")
    marker.write_bytes(intact)

    # the other two at once, as a scheduler runs them
    procs = [subprocess.Popen(_cli(*common, "--out", split, "--part", f"{i}/3"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (0, 2)]
    assert [p.wait() for p in procs] == [0, 3]  # part 2 holds shard 5: the two failed videos
    assert subprocess.run(_cli("merge", split), env=env, capture_output=True).returncode == 3
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in split.iterdir() if p.name != "parts")
    assert len([f for f in files if f.startswith("shard-")]) == 9
    for name in files:
        assert (whole / name).read_bytes() == (split / name).read_bytes(), name
    assert verify(split) == [] and verify(split, part=Part(2, 3)) == []
    assert not list(split.rglob("*.tmp"))


def test_merge_without_parts_and_with_a_damaged_shard(tmp_path, capsys):
    assert main(["merge", str(tmp_path)]) == 2 and "no params.json" in capsys.readouterr().err
    assert not (tmp_path / ".lock").exists()  # a directory that is not an output is left as it was
    root, annotations = write_kinetics_tree(tmp_path, clips_per_class=1)
    out = tmp_path / "out"
    args = ["kinetics400", "--root", str(root), "--annotations", str(annotations), "--out", str(out),
            "--workers", "1", "--videos-per-shard", "4", "--flow", "none"]
    assert [main(args + ["--part", f"{i}/2"]) for i in range(2)] == [0, 3]
    assert main(args + ["--part", "1/2", "--jpeg-quality", "80"]) == 2  # other params: refused ...
    assert (out / "parts" / Part(1, 2).marker_name).is_file()  # ... before the part's marker is touched
    shard = out / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short after its part finished
    assert main(["merge", str(out)]) == 2 and "rerun part 1/2" in capsys.readouterr().err
    assert main(args + ["--part", "1/2"]) == 3  # the shard no longer reads back as complete: redone
    assert main(["merge", str(out)]) == 3 and verify(out) == []
    marker = out / "parts" / Part(1, 2).marker_name  # damaged outside the tool: named, with what to do
    marker.write_text(marker.read_text()[:40])
    capsys.readouterr()
    assert main(["merge", str(out)]) == 2
    assert f"{marker} is not valid JSON" in capsys.readouterr().err
