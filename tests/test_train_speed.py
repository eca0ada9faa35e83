"""benchmarks/train_speed.py runs at smoke size on the CPU and reports every variant in its JSON line."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_speed  # noqa: E402
from trainer_fakes import bake_a_host_value_into_the_step, graphs_on_cpu, one_thread  # noqa: E402, F401 (autouse fixture)


def test_smoke_run_reports_every_eager_variant_against_the_legacy_row(tmp_path, capsys):
    variants = "legacy,fp32,bf16,channels_last,batch64,cotrain"
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", variants, "--profile",
                             "--json", str(tmp_path / "speed.json")]) == 0
    record = json.loads((tmp_path / "speed.json").read_text())
    assert record["device"] and record["torch"] and "error" not in record
    rows = {r["variant"]: r for r in record["results"]}
    assert set(rows) == {"legacy fp32 (old eager step)", "fp32", "fp32 channels_last_3d", "fp32 batch 8",
                         "fp32 stage 2 (cotrain)"}  # no bf16 on CPU
    assert all(r["samples_per_s"] > 0 and r["warmup_s"] > 0 for r in rows.values()), rows
    assert rows["legacy fp32 (old eager step)"]["speedup_vs_legacy"] == 1.0
    assert rows["fp32 batch 8"]["batch"] == 8 and rows["fp32 stage 2 (cotrain)"]["stage"] == "cotrain"
    launches = record["launches_per_step"]  # counted on the meta device
    assert launches["new"]["syncs"] == {} and launches["legacy"]["syncs"]
    assert launches["new"]["launches"] < launches["legacy"]["launches"]
    calls = launches["graphs_per_call"]  # the query's call, the key's clip and segments (one BN group each on meta)
    assert calls["syncs"] == {} and calls["graph_replays"] == 4 and calls["launches"] < launches["new"]["launches"] / 2
    # FLOPs: the legacy step does the same arithmetic; stage 2 adds the sampler's forward
    flops = {name: launches[name]["gflop_per_sample"] for name in ("new", "legacy", "cotrain")}
    assert flops["new"] > 0 and flops["legacy"] == pytest.approx(flops["new"], rel=1e-3) and flops["cotrain"] > flops["new"]
    traffic = {name: launches[name]["eager_fp32_gb_per_sample"] for name in ("new", "legacy", "cotrain")}
    assert 0 < traffic["new"] <= traffic["legacy"] and traffic["cotrain"] > traffic["new"]
    for row in rows.values():  # each row's TFLOP/s from its stage's count
        expected = flops["cotrain" if row["stage"] == "cotrain" else "new"] * row["samples_per_s"] / 1000
        assert row["tflop_per_s"] == pytest.approx(expected)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_variants_option_picks_and_rejects(tmp_path):
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32,legacy",
                             "--json", str(tmp_path / "speed.json")]) == 0
    record = json.loads((tmp_path / "speed.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["fp32", "legacy fp32 (old eager step)"]
    for bad in ("fp32,int8", "fp32+jit"):
        with pytest.raises(SystemExit, match="unknown"):
            train_speed.main(["--smoke", "--device", "cpu", "--variants", bad])


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """A GPU run must not lose its other rows to one variant's failure (a compiler error, say)."""
    real_step = train_speed.engine.train_step

    def failing_for_graph(ctx, *args):
        if ctx.config.run.compile == "graph":
            raise RuntimeError("capture failed\nsecond line")
        return real_step(ctx, *args)

    monkeypatch.setattr(train_speed.engine, "train_step", failing_for_graph)
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32,fp32+graph,legacy",
                             "--json", str(tmp_path / "speed.json")]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["fp32", "fp32 compile=graph", "legacy fp32 (old eager step)"]
    assert rows[1]["error"] == "RuntimeError: capture failed" and "failing_for_graph" in rows[1]["traceback_tail"]
    assert rows[0]["samples_per_s"] > 0 and rows[2]["samples_per_s"] > 0


@pytest.mark.slow
def test_compiled_row_runs_on_the_cpu(tmp_path):
    """Inductor compiles C++ for the tiny encoders: minutes on 2 shared cores."""
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "legacy,fp32+step",
                             "--json", str(tmp_path / "speed.json")]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert rows[1]["variant"] == "fp32 compile=step" and rows[1]["samples_per_s"] > 0


def test_graph_rows_compare_the_replay_with_the_eager_step(tmp_path, monkeypatch):
    graphs_on_cpu(monkeypatch)
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32+graph,cotrain+graph,fp32+calls",
                             "--json", str(tmp_path / "speed.json")]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["results"]
    # stage 2: a graph while its queue fills, then the training one once it is full; +calls: one
    # graph per encoder call (the query's clip and segments are one; the key's clip and its
    # segments one each, split BatchNorms as on a GPU)
    assert [row["cuda_graph"]["captures"] for row in rows] == [1, 2, 3]
    assert rows[2]["variant"] == "fp32 graphs per call" and rows[2]["graph_scope"] == "calls"
    for row in rows:
        graph = row["cuda_graph"]
        assert graph["error"] is None, row
        check = graph["vs_eager"]  # the stand-in replays bitwise
        assert check["max_loss_rel_diff"] == 0 and check["max_weight_abs_diff"] == 0 and check["steps"] >= 6, row


def test_a_wrong_replay_shows_in_the_comparison(tmp_path, monkeypatch):
    """A loss scaled by a host count is baked into the graph: the replayed steps leave the eager ones."""
    graphs_on_cpu(monkeypatch)
    bake_a_host_value_into_the_step(monkeypatch)
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "fp32+graph",
                             "--json", str(tmp_path / "speed.json")]) == 0
    check = json.loads((tmp_path / "speed.json").read_text())["results"][0]["cuda_graph"]["vs_eager"]
    assert check["max_weight_abs_diff"] > 1e-4, check


def test_a_timed_row_is_written_before_its_eager_comparison(tmp_path, monkeypatch):
    """A compiled row's comparison with the eager step can take long on a GPU (a second cuDNN
    autotune): a time limit that stops it there keeps the row's timing in the JSON."""
    graphs_on_cpu(monkeypatch)
    out = tmp_path / "speed.json"
    seen = []

    def stopped_here(*args):
        seen.append(json.loads(out.read_text()))
        raise KeyboardInterrupt  # what a time limit's signal does to the comparison

    monkeypatch.setattr(train_speed, "compare_with_eager", stopped_here)
    with pytest.raises(KeyboardInterrupt):
        train_speed.main(["--smoke", "--device", "cpu", "--variants", "legacy,fp32+graph", "--json", str(out)])
    rows = seen[0]["results"]
    assert [r["variant"] for r in rows] == ["legacy fp32 (old eager step)", "fp32 compile=graph"]
    assert rows[1]["samples_per_s"] > 0 and seen[0]["error"].startswith("incomplete")
    assert json.loads(out.read_text()) == seen[0]  # what the stopped run leaves


def test_progress_goes_to_stderr_as_it_goes(tmp_path, capsys, monkeypatch):
    """An S3D row spends minutes in its warm-up on a CPU: the run says what it is doing (the row, its
    warm-up, its timing, the result) on stderr as it goes, and stdout still ends with the JSON."""
    seen = []
    real_step = train_speed.engine.train_step

    def step(ctx, *args):  # what stderr holds when the first step of each row runs
        seen.append(capsys.readouterr().err)
        return real_step(ctx, *args)

    monkeypatch.setattr(train_speed.engine, "train_step", step)
    assert train_speed.main(["--smoke", "--device", "cpu", "--variants", "legacy,bf16,cotrain",
                             "--json", str(tmp_path / "speed.json")]) == 0
    first = seen[0].splitlines()
    assert first[0].startswith("train_speed: tiny on cpu, batch 4") and "2 rows (bf16 skipped: CUDA only)" in first[0]
    assert first[1:] == ["train_speed: [1/2] legacy fp32 (old eager step): building the model",
                         "train_speed: [1/2] legacy fp32 (old eager step): warm-up, 1 untimed step(s)"]
    final = capsys.readouterr()
    later = "".join(seen[1:]) + final.err
    assert "train_speed: [1/2] legacy fp32 (old eager step): timing 2 steps" in later
    assert "train_speed: [2/2] fp32 stage 2 (cotrain): warm-up, 16 steps filling stage 2's queue" in later
    assert "train_speed: [2/2] fp32 stage 2 (cotrain): " in later and " samples/s, " in later
    record = json.loads((tmp_path / "speed.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["legacy fp32 (old eager step)", "fp32 stage 2 (cotrain)"]
    assert json.loads(final.out.strip().splitlines()[-1]) == record
