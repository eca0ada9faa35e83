"""`verify` passes a sound dataset and names the shard of a truncated file or a flipped byte."""

import shutil

import pytest

from preprocess.cli import main
from preprocess.verify import verify


@pytest.fixture
def copy(synthetic_dataset, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(synthetic_dataset, out, ignore=shutil.ignore_patterns("raw"))
    return out


def test_sound_dataset_has_no_problem(copy, capsys):
    assert verify(copy) == []
    assert main(["verify", str(copy)]) == 0


def test_truncated_shard_is_caught(copy, capsys):
    shard = copy / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    problems = verify(copy)
    assert problems and all("shard-00001.h5" in p for p in problems)
    assert any("bytes" in p for p in problems) and any("sha256" in p for p in problems)
    assert main(["verify", str(copy)]) == 1
    assert "shard-00001.h5" in capsys.readouterr().err


def test_flipped_byte_is_caught(copy):
    shard = copy / "shard-00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF  # inside the JPEG blobs
    shard.write_bytes(bytes(data))
    problems = verify(copy, workers=1)
    assert any("shard-00002.h5" in p and "sha256" in p for p in problems)


def test_missing_shard_and_manifest(copy, tmp_path):
    (copy / "shard-00000.h5").unlink()
    assert any("shard-00000.h5: missing" in p for p in verify(copy))
    assert "no manifest.json" in verify(tmp_path)[0]
