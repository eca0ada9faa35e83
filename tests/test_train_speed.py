"""benchmarks/train_speed.py runs at smoke size on the CPU and reports every variant in its JSON line."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_speed  # noqa: E402
from benchmarks.common import write_toy_shards  # noqa: E402
from cvtcl.distributed import DistInfo  # noqa: E402
from cvtcl.errors import UsageError  # noqa: E402
from trainer_fakes import bake_a_host_value_into_the_step, graphs_on_cpu, one_thread  # noqa: E402, F401 (autouse fixture)


def test_smoke_sizes_are_defaults_that_given_flags_override():
    assert (train_speed.parse_args(["--smoke"]).steps, train_speed.parse_args(["--smoke"]).backbone) == (2, "tiny")
    given = train_speed.parse_args(["--smoke", "--steps", "5", "--warmup", "0"])
    assert (given.steps, given.warmup, given.batch) == (5, 0, 4)  # --smoke replaced them with 2, 1


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
    for bad in ("fp32,int8", "fp32+jit"):  # a usage error: exit 2 through run_script, before any row
        with pytest.raises(UsageError, match="unknown"):
            train_speed.main(["--smoke", "--device", "cpu", "--variants", bad])


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: a whole number >= 1, got '0'"),
    (["--steps", "0"], "argument --steps: a whole number >= 1"),
    (["--crop", "0"], "argument --crop: a whole number >= 1"),
    (["--warmup", "-3"], "argument --warmup: a whole number >= 0, got '-3'"),
    (["--gen-size", "0x5"], "--gen-size: sizes are HxW"),
    (["--json", "{tmp}/missing/speed.json"], "the folder {tmp}/missing does not exist"),
])
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(UsageError, match=message.format(tmp=tmp_path)):
        train_speed.main(["--device", "cpu", "--variants", "fp32", *argv])


def test_the_loader_row_without_warmup_times_its_own_steps(tmp_path):
    """--warmup 0: the loader's window starts with its first step (it was timed from perf_counter's
    zero, which gave ~0 samples/s)."""
    args = train_speed.parse_args(["--smoke", "--device", "cpu", "--data-backend", "baseline"])
    args.warmup = 0  # --smoke sets 1
    root = write_toy_shards(tmp_path / "shards", size=args.gen_size, num_videos=args.batch * args.steps,
                            frames=args.frames)
    start = time.perf_counter()
    row = train_speed.time_loader(args, DistInfo(0, 0, 1, torch.device("cpu")), "fp32", root)
    elapsed = time.perf_counter() - start
    assert row["steps"] == args.steps
    assert args.batch * row["steps"] / row["samples_per_s"] <= elapsed, row  # the window lies inside the call


def test_data_with_no_step_past_the_warmup_is_refused(tmp_path):
    """An epoch of --data no longer than --warmup leaves no timed step: refused before the rows."""
    root = write_toy_shards(tmp_path / "shards", size="24x32", num_videos=8, frames=8)  # 2 steps of 4
    with pytest.raises(UsageError, match="make 2 step\\(s\\) of --batch 4 an epoch, not more than --warmup 2"):
        train_speed.main(["--device", "cpu", "--data", str(root), "--batch", "4", "--warmup", "2"])


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
