"""Kinetics-400 indexing and packing on a generated tree in the official layout."""

import shutil

import pytest

from kinetics_fakes import BROKEN, MISSING, write_kinetics_tree
from preprocess.cli import main
from preprocess.datasets import DatasetError
from preprocess.kinetics import SOURCE_GROUPS, clip_name, index_kinetics400
from preprocess.schema import load_manifest
from preprocess.verify import verify


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_kinetics_tree(tmp_path_factory.mktemp("k400"))


def test_index_classes_splits_groups(tree):
    index = index_kinetics400(*tree)
    assert index.dataset == "kinetics400"
    assert index.classes == ["abseiling", "air drumming", "riding a bike"]  # the CSV labels, sorted
    by_name = {v.name: v for v in index.videos}
    assert all(v.group == v.name for v in index.videos)  # no source groups in Kinetics
    assert index.params["source_groups"] == SOURCE_GROUPS
    first = by_name[clip_name("rid000xxxxx", 0, 10)]
    assert (first.class_name, first.label) == ("riding a bike", 2)
    assert first.path.endswith("train/rid000xxxxx_000000_000010.mp4")
    assert index.splits["1"]["train"] == index.splits["official"]["train"]
    assert index.splits["1"]["test"] == index.splits["official"]["validate"]
    assert len(index.splits["official"]["train"]) == 10 and len(index.splits["official"]["test"]) == 3
    assert MISSING in index.splits["1"]["train"] and BROKEN in index.splits["1"]["test"]
    assert index.params["unlabelled_rows_skipped"] == 2 and not any(n.startswith("unlabel") for n in by_name)


def test_class_folders_index_like_flat_files(tree, tmp_path):
    nested = write_kinetics_tree(tmp_path, class_folders=True)
    flat, folders = index_kinetics400(*tree), index_kinetics400(*nested)
    assert [(v.name, v.label) for v in flat.videos] == [(v.name, v.label) for v in folders.videos]
    assert "/train/abseiling/" in next(v.path for v in folders.videos if v.name.startswith("abs100"))
    assert folders.splits == flat.splits


def test_a_clip_found_twice_resolves_to_the_replacement(tree, tmp_path):
    root, annotations = tree
    copy = tmp_path / "videos"
    shutil.copytree(root, copy)
    name = clip_name("abs100xxxxx", 0, 10)
    for folder in ("replacement/replacement_for_corrupted_k400", "a_duplicates"):
        (copy / folder).mkdir(parents=True)
        shutil.copy(copy / "train" / f"{name}.mp4", copy / folder / f"{name}.mp4")
    by_name = {v.name: v.path for v in index_kinetics400(copy, annotations).videos}
    assert by_name[name] == str(copy / "replacement/replacement_for_corrupted_k400" / f"{name}.mp4")
    other = clip_name("abs101xxxxx", 10, 20)
    (copy / "a_duplicates" / f"{other}.mkv").write_bytes(b"")
    assert index_kinetics400(copy, annotations).videos[1].path == str(copy / "a_duplicates" / f"{other}.mkv")


def test_linked_folders_are_searched_and_a_root_without_the_clips_is_refused(tree, tmp_path):
    """A download linked into --root was not searched (every clip under it 'missing'), and a wrong
    or unmounted --root packed an empty dataset with exit 3, which batch recipes count as done."""
    root, annotations = tree
    linked = tmp_path / "linked"
    linked.mkdir()
    for folder in ("train", "validate"):
        (linked / folder).symlink_to(root / folder)
    (linked / "back").symlink_to(linked)  # a link back up the tree: searched once
    assert [(v.name, v.label) for v in index_kinetics400(linked, annotations).videos] == [
        (v.name, v.label) for v in index_kinetics400(root, annotations).videos]
    assert "/linked/train/" in next(v.path for v in index_kinetics400(linked, annotations).videos
                                     if v.name.startswith("abs100"))
    (tmp_path / "unmounted").mkdir()
    with pytest.raises(DatasetError, match=r"none of the 17 labelled clips the CSVs list is under --root .*unmounted "
                                           r"\(such as \w+\.mp4, in any folder below it\); check the path"):
        index_kinetics400(tmp_path / "unmounted", annotations)


def test_a_csv_with_a_byte_order_mark_reads_as_without(tree, tmp_path):
    """Excel and pandas' utf-8-sig put one first: the header's first column was '\ufefflabel'."""
    root, annotations = tree
    copy = shutil.copytree(annotations, tmp_path / "ann")
    (copy / "train.csv").write_bytes(b"\xef\xbb\xbf" + (annotations / "train.csv").read_bytes())
    assert index_kinetics400(root, copy).splits == index_kinetics400(root, annotations).splits


def test_missing_annotations_and_columns_are_named(tree, tmp_path):
    root, annotations = tree
    copy = tmp_path / "ann"
    shutil.copytree(annotations, copy)
    (copy / "test.csv").unlink()  # optional
    assert "test" not in index_kinetics400(root, copy).splits["official"]
    (copy / "validate.csv").rename(copy / "val.csv")  # CVDF's name for it
    assert index_kinetics400(root, copy).splits["1"] == index_kinetics400(root, annotations).splits["1"]
    (copy / "val.csv").unlink()
    with pytest.raises(DatasetError, match="validate.csv"):
        index_kinetics400(root, copy)
    (copy / "validate.csv").write_text("label,youtube_id,time_end\nabseiling,abc,10\n")
    with pytest.raises(DatasetError, match="validate.csv: no column time_start"):
        index_kinetics400(root, copy)
    (copy / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,abc,1.5,10,val\n")
    with pytest.raises(DatasetError, match="validate.csv:2"):
        index_kinetics400(root, copy)
    with pytest.raises(DatasetError, match="nowhere"):
        index_kinetics400(tmp_path / "nowhere", annotations)


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory):
    root, annotations = tree
    out = tmp_path_factory.mktemp("k400-packed") / "out"
    argv = ["kinetics400", "--root", str(root), "--annotations", str(annotations), "--out", str(out),
            "--workers", "1", "--videos-per-shard", "4"]
    assert main(argv) == 3  # some videos failed, the dataset was written
    return out


def test_pack_records_missing_and_broken_downloads(packed):
    out = packed
    manifest = load_manifest(out)
    failed = {f.name: f.reason for f in manifest.failed}
    assert sorted(failed) == sorted([BROKEN, MISSING])
    assert "no such file" in failed[MISSING] and "cannot open" in failed[BROKEN]
    assert len(manifest.videos) == 15 and manifest.params["source_groups"] == SOURCE_GROUPS
    assert MISSING not in manifest.splits["1"]["train"] and BROKEN not in manifest.splits["1"]["test"]
    assert verify(out) == []


def test_linear_probe_on_kinetics400(packed, tmp_path):
    from cvtcl import eval as cvtcl_eval

    payload = cvtcl_eval.main(["linear", "--random-init", "rgb", "--backbone", "tiny", "--dataset", "kinetics400",
                               "--shards", str(packed), "--backend", "baseline", "--device", "cpu",
                               "--frames-per-clip", "4", "--window-stride", "4", "--crop-size", "16",
                               "--epochs", "2", "--out", str(tmp_path)])
    assert payload["dataset"] == "kinetics400" and set(payload["results"]) == {"rgb"}
    assert (tmp_path / "eval-linear-kinetics400-split1.json").is_file()
