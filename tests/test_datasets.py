"""UCF101 and HMDB51 indexing on small trees in the official layouts."""

import pytest

from preprocess.datasets import DatasetError, index_hmdb51, index_ucf101


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def ucf_root(tmp_path):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n")
    names = {
        "ApplyEyeMakeup": ["v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g01_c02", "v_ApplyEyeMakeup_g08_c01"],
        # the official quirk: folder HandstandPushups, files v_HandStandPushups_*
        "HandstandPushups": ["v_HandStandPushups_g01_c01", "v_HandStandPushups_g09_c03"],
    }
    for cls, stems in names.items():
        for stem in stems:
            _touch(root / "UCF-101" / cls / f"{stem}.avi")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nHandstandPushups/v_HandStandPushups_g09_c03.avi 2\r\n"
        "HandstandPushups/v_HandStandPushups_g10_c01.avi 2\r\n"  # listed, not on disk
    )
    (lists / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi\r\n"
        "HandstandPushups/v_HandStandPushups_g01_c01.avi\r\n"
    )
    (lists / "trainlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\n")
    (lists / "testlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\r\n")
    return root


def test_ucf101_labels_groups_and_splits(ucf_root):
    index = index_ucf101(ucf_root)
    assert index.classes == ["ApplyEyeMakeup", "HandstandPushups"]
    by_name = {v.name: v for v in index.videos}
    assert [v.name for v in index.videos] == sorted(by_name)
    hs = by_name["v_HandStandPushups_g09_c03"]
    assert (hs.label, hs.class_name, hs.group) == (1, "HandstandPushups", "HandstandPushups_g09")
    assert by_name["v_ApplyEyeMakeup_g01_c02"].group == by_name["v_ApplyEyeMakeup_g01_c01"].group == "ApplyEyeMakeup_g01"
    assert by_name["v_ApplyEyeMakeup_g01_c01"].label == 0
    # a listed video that is missing on disk is kept, so packing records it as failed
    assert not (ucf_root / "UCF-101" / "HandstandPushups" / "v_HandStandPushups_g10_c01.avi").exists()
    assert "v_HandStandPushups_g10_c01" in by_name
    assert sorted(index.splits) == ["1", "2"]
    assert index.splits["1"]["train"] == ["v_ApplyEyeMakeup_g08_c01", "v_HandStandPushups_g09_c03", "v_HandStandPushups_g10_c01"]
    assert index.splits["1"]["test"] == ["v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g01_c02", "v_HandStandPushups_g01_c01"]
    assert index.splits["2"] == {"train": ["v_ApplyEyeMakeup_g01_c01"], "test": ["v_ApplyEyeMakeup_g08_c01"]}


@pytest.mark.parametrize("missing", ["", "UCF-101", "ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/testlist01.txt"])
def test_ucf101_missing_parts_are_named(ucf_root, missing):
    import shutil

    target = ucf_root / missing if missing else ucf_root
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=str(target)):
        index_ucf101(ucf_root)


@pytest.fixture
def hmdb(tmp_path):
    root, splits = tmp_path / "hmdb51", tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for cls, videos in {"wave": ["a_wave_u_cm_np1_fr_goo_0", "b_wave"], "brush_hair": ["c#brush&hair_(x)", "d_brush"]}.items():
        for v in videos:
            _touch(root / cls / f"{v}.avi")
        for k in (1, 2, 3):
            marks = {1: ["1", "2"], 2: ["2", "0"], 3: ["0", "1"]}[k]
            (splits / f"{cls}_test_split{k}.txt").write_text("".join(f"{v}.avi {m} \n" for v, m in zip(videos, marks)))
    return root, splits


def test_hmdb51_labels_groups_and_splits(hmdb):
    index = index_hmdb51(*hmdb)
    assert index.classes == ["brush_hair", "wave"]  # sorted
    by_name = {v.name: v for v in index.videos}
    assert by_name["c#brush&hair_(x)"].label == 0 and by_name["b_wave"].label == 1
    assert all(v.group == v.name for v in index.videos)  # HMDB51 has no source groups
    assert index.splits["1"] == {"train": ["a_wave_u_cm_np1_fr_goo_0", "c#brush&hair_(x)"], "test": ["b_wave", "d_brush"]}
    assert index.splits["2"] == {"train": [], "test": ["a_wave_u_cm_np1_fr_goo_0", "c#brush&hair_(x)"]}  # 0 = unused
    assert index.splits["3"] == {"train": ["b_wave", "d_brush"], "test": []}


def test_hmdb51_missing_split_file_and_root_are_named(hmdb, tmp_path):
    root, splits = hmdb
    (splits / "wave_test_split2.txt").unlink()
    with pytest.raises(DatasetError, match="wave_test_split2.txt"):
        index_hmdb51(root, splits)
    with pytest.raises(DatasetError, match="nowhere"):
        index_hmdb51(tmp_path / "nowhere", splits)
    with pytest.raises(DatasetError, match="nosplits"):
        index_hmdb51(root, tmp_path / "nosplits")


def test_hmdb51_one_name_in_two_class_folders_is_an_error_naming_both(hmdb):
    """Two files of one name would become one video (the manifest, splits and shards know a video by
    name), and one class's train line and the other's test line would put it on both sides."""
    root, splits = hmdb
    _touch(root / "wave" / "d_brush.avi")
    with open(splits / "wave_test_split1.txt", "a") as fh:
        fh.write("d_brush.avi 1\n")
    with pytest.raises(DatasetError, match=r"brush_hair/d_brush.avi and .*wave/d_brush.avi: two videos named d_brush"):
        index_hmdb51(root, splits)


def test_ucf101_one_name_in_two_class_folders_is_an_error(ucf_root):
    _touch(ucf_root / "UCF-101" / "HandstandPushups" / "v_ApplyEyeMakeup_g01_c01.avi")
    with pytest.raises(DatasetError, match="two videos named v_ApplyEyeMakeup_g01_c01"):
        index_ucf101(ucf_root)


@pytest.mark.parametrize("line, where", [("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1", "in both train and test"),
                                         ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "twice in train")])
def test_a_split_listing_a_video_twice_or_on_both_sides_is_an_error(ucf_root, line, where):
    with open(ucf_root / "ucfTrainTestlist" / "trainlist01.txt", "a") as fh:
        fh.write(line + "\r\n")
    name = line.split("/")[1].split(".")[0]
    with pytest.raises(DatasetError, match=f"split 1 lists {name} {where}; fix the split files"):
        index_ucf101(ucf_root)


def test_a_file_name_with_spaces_in_the_split_files(ucf_root, hmdb):
    """A split line was split at every space: 'v_Beta x_g03_c01.avi 2' read as the file 'v_Beta', an
    error naming a path that does not exist; a bad line is named by its file and line number."""
    _touch(ucf_root / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup x_g02_c01.avi")
    lists = ucf_root / "ucfTrainTestlist"
    with open(lists / "trainlist01.txt", "a") as fh:
        fh.write("ApplyEyeMakeup/v_ApplyEyeMakeup x_g02_c01.avi 1\r\n")
    assert "v_ApplyEyeMakeup x_g02_c01" in index_ucf101(ucf_root).splits["1"]["train"]
    with open(lists / "testlist01.txt", "a") as fh:
        fh.write("ApplyEyeMakeup/v_ApplyEyeMakeup x.avi\r\n")
    with pytest.raises(DatasetError, match=rf"{lists / 'testlist01.txt'}:4: .*v_ApplyEyeMakeup x.avi: name is not "
                                           "v_<Class>_gXX_cYY"):
        index_ucf101(ucf_root)
    root, splits = hmdb
    _touch(root / "wave" / "e wave.avi")
    with open(splits / "wave_test_split1.txt", "a") as fh:
        fh.write("e wave.avi 1\n")
    assert "e wave" in index_hmdb51(root, splits).splits["1"]["train"]
    with open(splits / "wave_test_split1.txt", "a") as fh:
        fh.write("f wave.avi\n")
    with pytest.raises(DatasetError, match=r"wave_test_split1.txt:4: expected lines '<video>.avi 0\|1\|2', got "
                                           "'f wave.avi' and no number"):
        index_hmdb51(root, splits)


def test_a_root_holding_none_of_the_listed_videos_is_an_error_before_any_work(ucf_root, hmdb):
    """Split files naming .avi over folders of .mp4 (or a disk not mounted) packed an empty dataset,
    every video "failed", with the exit status of a run where only some did."""
    for path in list((ucf_root / "UCF-101").rglob("*.avi")):
        path.rename(path.with_suffix(".mp4"))
    with pytest.raises(DatasetError, match=r"none of the 6 videos the split files list is under .*UCF-101 \(first: "
                                           r".*\.avi\); its class folders hold \.mp4 files: name those in the split files"):
        index_ucf101(ucf_root)
    root, splits = hmdb
    for path in list(root.rglob("*.avi")):
        path.unlink()
    with pytest.raises(DatasetError, match=r"none of the 4 videos the split files list is under"):
        index_hmdb51(root, splits)


def test_a_hidden_folder_under_the_hmdb51_root_is_no_class(hmdb):
    root, splits = hmdb
    (root / ".ipynb_checkpoints").mkdir()
    assert index_hmdb51(root, splits).classes == ["brush_hair", "wave"]  # was: a split file of that "class" missing
