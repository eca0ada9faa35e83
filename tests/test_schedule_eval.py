"""Schedule-wide evaluation: settings from sub-stage directories, both random-init BN modes, loss fall."""

import json

import pytest

from cvtcl.linear_probe import LinearProbeConfig
from cvtcl.report import results_table
from cvtcl.schedule_eval import (
    evaluate_settings,
    learning_checks,
    loss_drop,
    random_init_settings,
    schedule_settings,
    table_rows,
)
from eval_fakes import FakeEvalLoader, TinyEncoder, make_videos

TRAIN = make_videos(num_classes=3, per_class=6, groups_per_class=3, prefix="train")
TEST = make_videos(num_classes=3, per_class=3, groups_per_class=3, prefix="test")


def fake_factory(subset, modality, crops):
    return FakeEvalLoader(TRAIN if subset == "train" else TEST, modality, crops=crops, noise=0.3)


def test_schedule_settings_group_sub_stages(tmp_path):
    for name in ("stage1-rgb", "stage1-flow", "cycle1-rgb", "cycle1-flow", "cycle2-rgb", "notes", "cycle2-flow"):
        (tmp_path / name).mkdir()
    (tmp_path / "stage1-rgb.log").write_text("")
    loaded = []

    def load(run_dir):
        loaded.append(run_dir.name)
        return None if run_dir.name == "cycle2-flow" else TinyEncoder(run_dir.name.split("-")[1])

    settings = schedule_settings(tmp_path, load)
    assert [s.name for s in settings] == ["stage 1", "cycle 1", "cycle 2"]
    assert sorted(settings[0].encoders) == ["flow", "rgb"] and list(settings[2].encoders) == ["rgb"]
    assert "notes" not in loaded


def test_evaluate_settings_reports_every_stream_and_bn_mode():
    settings = random_init_settings(lambda m: TinyEncoder(m))
    assert [s.bn_mode for s in settings] == ["eval", "batch"]
    results, last = evaluate_settings(settings, fake_factory, 3, probe=LinearProbeConfig(epochs=3, batch_size=8))
    assert list(results) == ["random-init (BN eval)", "random-init (BN batch)"]
    assert set(results["random-init (BN batch)"]) == {"rgb", "flow", "two-stream"}
    assert set(results["random-init (BN eval)"]["flow"]) == {"R@1", "R@5", "R@10", "linear top-1"}
    assert results["random-init (BN eval)"]["rgb"] != results["random-init (BN batch)"]["rgb"]
    assert last["setting"] == "random-init (BN batch)" and last["tops"]["rgb"].shape == (len(TEST), 3)
    rows = table_rows(results)
    assert list(rows)[0] == "random-init (BN eval) / rgb"
    assert results_table("t", rows, label="setting / stream").row_count == 6


def test_loss_drop(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 10.0 - i}) + "\n" for i in range(8)))
    got = loss_drop(path, window=2)
    assert got["first"] == 9.5 and got["last"] == 3.5 and got["fall"] == pytest.approx(0.6316, abs=1e-4)
    path.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="fewer than two"):
        loss_drop(path)


def test_learning_checks(tmp_path):
    for name, losses in (("stage1-rgb", [10, 9, 8, 7, 4, 3]), ("stage1-flow", [10, 10, 9, 9, 8, 8])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))
    r = lambda rgb, flow: {"rgb": {"R@1": rgb}, "flow": {"R@1": flow}}
    results = {"random-init (BN eval)": r(20.0, 30.0), "random-init (BN batch)": r(25.0, 36.0),
               "stage 1": r(22.0, 40.0), "cycle 2": r(35.0, 41.5)}
    checks = {c["check"]: c for c in learning_checks(results, tmp_path)}
    gain = checks["flow R@1, cycle 2 minus best random-init"]
    assert gain["value"] == 5.5 and gain["passed"]
    assert checks["stage1-rgb loss fall"]["passed"] and not checks["stage1-flow loss fall"]["passed"]
    assert checks["rgb R@1 change, stage 1 -> cycle 2"]["value"] == 13.0
