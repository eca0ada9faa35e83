"""benchmarks/train_speed.py runs at smoke size and reports every variant in its JSON line."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_speed  # noqa: E402
from trainer_fakes import one_thread  # noqa: E402, F401 (autouse fixture)


def test_smoke_run_reports_all_variants(tmp_path, capsys):
    assert train_speed.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "speed.json")]) == 0
    record = json.loads((tmp_path / "speed.json").read_text())
    assert record["device"] and record["torch"]
    variants = {r["variant"]: r for r in record["results"]}
    assert set(variants) == {"fp32", "fp32 channels_last_3d", "fp32 segments one by one"}  # no bf16 on CPU
    assert all(r["samples_per_s"] > 0 for r in variants.values())
    assert variants["fp32"]["speedup_vs_fp32"] == 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_variants_option_picks_and_rejects(tmp_path):
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32,one_by_one",
                             "--json", str(tmp_path / "speed.json")]) == 0
    record = json.loads((tmp_path / "speed.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["fp32", "fp32 segments one by one"]
    try:
        train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32,int8"])
    except SystemExit as err:
        assert "int8" in str(err)
    else:
        raise AssertionError("an unknown variant must be refused")
