"""`verify` passes a sound dataset and names the shard of a truncated file or a flipped byte."""

import json
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


def _break_header_json(shard):
    """Damage the shard's header (the JSON list of its videos, HDF5 metadata): a ':' becomes ';'."""
    data = bytearray(shard.read_bytes())
    colon = data.index(b'"name": ') + len(b'"name"')
    data[colon] = ord(";")
    shard.write_bytes(bytes(data))


def test_damaged_header_is_named_without_the_json_error(copy, capsys):
    """A damaged index once also printed json's 'cannot be read (Expecting ':' delimiter: line 1
    column 3949 ...)': the index problem is the whole story, and the summary says how to repair."""
    shard = copy / "shard-00000.h5"
    _break_header_json(shard)
    problems = verify(copy)
    assert any("shard-00000.h5" in p and "index" in p and "damaged" in p for p in problems), problems
    assert not any("Expecting" in p or "delimiter" in p for p in problems), problems
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "Expecting" not in err and "rerun the cvtcl-preprocess command that wrote it" in err


def test_header_that_is_not_json_is_a_clear_layout_error(copy):
    """Past the index check too (a manifest written after the damage): the header itself is named."""
    from preprocess.schema import LayoutError, load_manifest
    from preprocess.shards import data_regions, file_sha256, index_crc32, read_shard_header

    shard = copy / "shard-00000.h5"
    _break_header_json(shard)
    with pytest.raises(LayoutError, match=r"shard-00000\.h5: its header \(the 'videos' list\) is damaged: not valid JSON"):
        read_shard_header(shard)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=file_sha256(shard), index_crc32=index_crc32(shard, data_regions(shard)))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_manifest(copy)
    problems = verify(copy)
    assert problems == [f"{shard}: its header (the 'videos' list) is damaged: not valid JSON"]
