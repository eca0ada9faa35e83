"""The evaluation entry points, with fake loaders/checkpoints standing in for DALI and the trainer."""

import json
import sys
import types
from unittest import mock

import pytest
import torch

from cvtcl import eval as cvtcl_eval
from cvtcl.errors import UsageError
from cvtcl.finetune import FinetuneConfig
from cvtcl.linear_probe import LinearProbeConfig
from cvtcl.report import neighbours_path, results_path
from cvtcl.selection import heldout_split
from eval_fakes import FakeEvalLoader, FakePretrainLoader, TinyEncoder, make_videos
from preprocess.schema import Manifest, write_json_atomic
from processes import lock_held_elsewhere

TRAIN = make_videos(num_classes=3, per_class=8, groups_per_class=4, prefix="train")
TEST = make_videos(num_classes=3, per_class=4, groups_per_class=2, prefix="test")


def fake_factory(subset, modality, crops, videos=None):
    pool = TRAIN if subset == "train" else TEST
    if videos is not None:
        by_name = {v.name: v for v in pool}
        pool = [by_name[name] for name in videos]
    return FakeEvalLoader(pool, modality, crops=crops, noise=0.3)


def encoders():
    return {"rgb": TinyEncoder("rgb", seed=0), "flow": TinyEncoder("flow", seed=1)}


def test_retrieval_and_linear_with_model_objects():
    train, test = cvtcl_eval.split_features(encoders(), fake_factory)
    recalls, tops = cvtcl_eval.run_retrieval(train, test)
    assert set(recalls) == {"rgb", "flow", "two-stream"}
    assert list(recalls["rgb"]) == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    assert recalls["two-stream"]["R@1"] == 100.0  # clean class patterns
    assert tops["rgb"].shape == (len(TEST), 3)
    linear = cvtcl_eval.run_linear(train, test, 3, LinearProbeConfig(epochs=20, batch_size=8, lr=1e-2))
    assert set(linear) == {"rgb", "flow", "two-stream"}
    assert linear["two-stream"]["top1"] > 90.0


def train_loader_of(names, modality="rgb"):
    by_name = {v.name: v for v in TRAIN}
    return FakePretrainLoader([by_name[name] for name in names], modality, batch_size=6, noise=0.3)


def test_finetune_with_model_objects(capsys):
    """The fine-tune trains on the train videos less the held-out ones (whole batches, no held-out
    clip); results name the selected epoch as the progress lines do, counted from 1 ("best ...
    after epoch N"); the two-stream row has none."""
    trained_on = {}
    make_train = lambda modality, videos: trained_on.setdefault(modality, train_loader_of(videos, modality))
    config = FinetuneConfig(epochs=2, eval_every=1, dropout=0.2)
    results = cvtcl_eval.run_finetune(encoders(), fake_factory, make_train, 3, config=config)
    fit, held = heldout_split(TRAIN, 0.1, config.seed)
    for loader in trained_on.values():
        assert [v.name for v in loader.videos] == [TRAIN[i].name for i in fit] and held
        assert len(loader.seen) == 2 * loader.steps_per_epoch * loader.batch_size  # every step trained
    assert set(results) == {"rgb", "flow", "two-stream"}
    assert results["rgb"]["epoch"] in (1, 2) and "heldout_top1" in results["flow"]
    assert "epoch" not in results["two-stream"]
    lines = capsys.readouterr().out.splitlines()
    for modality in ("rgb", "flow"):
        (last,) = [line for line in lines if line.startswith(f"fine-tune {modality}: epoch 2/2")]
        assert last.endswith(f"after epoch {results[modality]['epoch']})"), last


@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    """A manifest plus stand-ins for cvtcl.data and cvtcl.checkpoint (modality = checkpoint name)."""
    videos = TRAIN + TEST
    manifest = Manifest("synthetic", {"flow": {"backend": "fake"}}, ["C0", "C1", "C2"], [], videos,
                        {"1": {"train": [v.name for v in TRAIN], "test": [v.name for v in TEST]}})
    write_json_atomic(tmp_path / "manifest.json", manifest.to_dict())
    for name in ("rgb.pt", "rgb2.pt", "flow.pt"):  # read by the stand-in load_encoder below, never opened
        (tmp_path / name).touch()
    calls = []

    def build_eval_loader(root, *, subset, modality, crops, videos=None, **kwargs):
        calls.append((subset, modality, crops, kwargs))
        return fake_factory(subset, modality, crops, videos)

    data = types.SimpleNamespace(build_eval_loader=build_eval_loader, build_pretrain_loader=None)
    checkpoint = types.SimpleNamespace(
        load_encoder=lambda path, map_location: (TinyEncoder("flow" if "flow" in str(path) else "rgb"), {}))
    monkeypatch.setitem(sys.modules, "cvtcl.data", data)
    monkeypatch.setitem(sys.modules, "cvtcl.checkpoint", checkpoint)
    return tmp_path, calls


def test_cli_two_stream_retrieval_writes_results_and_neighbours(fake_project, capsys):
    root, calls = fake_project
    out = root / "run"
    payload = cvtcl_eval.main(["retrieval", "--checkpoint", str(root / "rgb.pt"), "--checkpoint-flow",
                               str(root / "flow.pt"), "--dataset", "synthetic", "--shards", str(root),
                               "--out", str(out), "--device", "cpu"])
    assert {c[:3] for c in calls} == {(s, m, "center") for s in ("train", "test") for m in ("rgb", "flow")}
    assert calls[0][3]["window_stride"] == 16 and calls[0][3]["frames_per_clip"] == 32
    saved = json.loads(results_path(out, "retrieval", "synthetic", "1").read_text())
    assert saved["results"] == payload["results"] and set(saved["results"]) == {"rgb", "flow", "two-stream"}
    assert saved["device"]["type"] == "cpu" and saved["versions"]["torch"] == torch.__version__  # what computed them
    neighbours = json.loads(neighbours_path(out, "synthetic", "1").read_text())
    assert len(neighbours["queries"]) == len(TEST) and len(neighbours["gallery"]) == len(TRAIN)
    assert len(neighbours["neighbours"]["two-stream"][0]) == 3
    printed = capsys.readouterr().out
    assert "two-stream" in printed and "R@50" in printed


def test_cli_linear_random_init(fake_project, monkeypatch):
    root, _ = fake_project
    monkeypatch.setitem(sys.modules, "cvtcl.models", types.SimpleNamespace(Encoder=lambda m, b: TinyEncoder(m)))
    payload = cvtcl_eval.main(["linear", "--random-init", "flow", "--bn-mode", "batch", "--epochs", "3",
                               "--dataset", "synthetic", "--shards", str(root), "--out", str(root)])
    assert set(payload["results"]) == {"flow"} and payload["encoders"] == {"flow": "random-init s3d"}
    assert payload["bn_mode"] == "batch"


def test_cli_writes_next_to_the_checkpoint_and_never_overwrites(fake_project, monkeypatch):
    root, _ = fake_project
    run = root / "runs" / "stage1"
    run.mkdir(parents=True)
    (run / "rgb.pt").touch()
    argv = ["retrieval", "--checkpoint", str(run / "rgb.pt"), "--dataset", "synthetic", "--shards", str(root),
            "--device", "cpu"]
    cvtcl_eval.main(argv)
    first = json.loads(results_path(run, "retrieval", "synthetic", "1").read_text())
    cvtcl_eval.main(argv)  # a second evaluation keeps the first one's files and adds -2 files
    assert json.loads(results_path(run, "retrieval", "synthetic", "1").read_text()) == first
    assert (run / "eval-retrieval-synthetic-split1-2.json").is_file()
    assert (run / "retrieval-neighbours-synthetic-split1-2.json").is_file()
    # --random-init without --out: the current directory, not its parent
    monkeypatch.chdir(run)
    monkeypatch.setitem(sys.modules, "cvtcl.models", types.SimpleNamespace(Encoder=lambda m, b: TinyEncoder(m)))
    cvtcl_eval.main(["retrieval", "--random-init", "rgb", "--dataset", "synthetic", "--shards", str(root)])
    assert (run / "eval-retrieval-synthetic-split1-3.json").is_file()
    assert not list(run.parent.glob("eval-*.json"))


def test_each_protocol_numbers_only_the_files_it_writes(fake_project):
    """A retrieval's results and neighbours do not push the first linear or finetune results in the
    same directory to -2; a retrieval still counts a neighbours file left alone."""
    root, _ = fake_project
    out = root / "run"
    argv = ["--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic", "--shards", str(root), "--out", str(out),
            "--device", "cpu", "--epochs", "2"]
    cvtcl_eval.main(["retrieval", *argv])
    cvtcl_eval.main(["linear", *argv])
    assert sorted(p.name for p in out.glob("*.json")) == [
        "eval-linear-synthetic-split1.json", "eval-retrieval-synthetic-split1.json",
        "retrieval-neighbours-synthetic-split1.json"]
    for protocol in ("linear", "finetune"):
        assert cvtcl_eval.output_paths(out, protocol, "synthetic", "1") == (
            out / f"eval-{protocol}-synthetic-split1{'-2' if protocol == 'linear' else ''}.json", None)
    (out / "eval-retrieval-synthetic-split1.json").unlink()
    assert cvtcl_eval.output_paths(out, "retrieval", "synthetic", "1") == (
        out / "eval-retrieval-synthetic-split1-2.json", out / "retrieval-neighbours-synthetic-split1-2.json")


def test_an_evaluation_finishing_during_another_keeps_its_results(fake_project, monkeypatch):
    """Two evaluations into one directory at once (the default --out is the checkpoint's): the names
    were numbered when each started, so the one finishing last overwrote the other's results."""
    root, _ = fake_project
    out = root / "run"
    argv = ["retrieval", "--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic", "--shards", str(root),
            "--out", str(out), "--device", "cpu"]
    real = cvtcl_eval.run_protocol
    started = []

    def with_another_one_meanwhile(*args, **kwargs):
        started.append(1)
        if len(started) == 1:  # the first evaluation is at work: a second one runs start to finish
            cvtcl_eval.main([*argv, "--seed", "1"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cvtcl_eval, "run_protocol", with_another_one_meanwhile)
    cvtcl_eval.main(argv)
    seeds = {p.name: json.loads(p.read_text())["seed"] for p in out.glob("eval-*.json")}
    assert seeds == {"eval-retrieval-synthetic-split1.json": 1, "eval-retrieval-synthetic-split1-2.json": 0}
    assert (out / "retrieval-neighbours-synthetic-split1-2.json").stat().st_size > 0


def test_results_never_leave_the_output_directory(tmp_path):
    with pytest.raises(UsageError, match="would write outside"):
        cvtcl_eval.output_paths(tmp_path, "linear", "synthetic", "1/../../elsewhere")


def test_cli_takes_frames_and_crop_from_the_checkpoint(fake_project, monkeypatch):
    root, calls = fake_project
    trained = {"data": {"frames_per_clip": 8, "crop_size": 32}}
    monkeypatch.setitem(sys.modules, "cvtcl.checkpoint",
                        types.SimpleNamespace(load_encoder=lambda path, map_location: (TinyEncoder("rgb"), trained)))
    payload = cvtcl_eval.main(["retrieval", "--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic",
                               "--shards", str(root), "--out", str(root / "a")])
    assert {(c[3]["frames_per_clip"], c[3]["crop_size"], c[3]["window_stride"]) for c in calls} == {(8, 32, 4)}
    assert (payload["frames_per_clip"], payload["crop_size"]) == (8, 32)
    calls.clear()
    cvtcl_eval.main(["retrieval", "--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic", "--shards",
                     str(root), "--out", str(root / "b"), "--frames-per-clip", "16", "--window-stride", "16"])
    assert {(c[3]["frames_per_clip"], c[3]["crop_size"], c[3]["window_stride"]) for c in calls} == {(16, 32, 16)}
    # two-stream from checkpoints trained on different clips: the user says which
    other = {"data": {"frames_per_clip": 16, "crop_size": 32}}
    monkeypatch.setitem(sys.modules, "cvtcl.checkpoint", types.SimpleNamespace(load_encoder=lambda path, map_location: (
        (TinyEncoder("flow"), other) if "flow" in str(path) else (TinyEncoder("rgb"), trained))))
    two_stream = ["retrieval", "--checkpoint", str(root / "rgb.pt"), "--checkpoint-flow", str(root / "flow.pt"),
                  "--dataset", "synthetic", "--shards", str(root), "--out", str(root / "c")]
    with pytest.raises(UsageError, match=r"different data.frames_per_clip \(\[8, 16\]\); choose one with --frames-per-clip"):
        cvtcl_eval.main(two_stream)
    assert cvtcl_eval.main([*two_stream, "--frames-per-clip", "8"])["frames_per_clip"] == 8


def test_cli_refuses_wrong_dataset_and_two_rgb_checkpoints(fake_project):
    root, _ = fake_project
    with pytest.raises(UsageError, match="synthetic"):
        cvtcl_eval.main(["retrieval", "--checkpoint", f"{root}/rgb.pt", "--dataset", "ucf101", "--shards", str(root)])
    with pytest.raises(UsageError, match="--checkpoint-flow .*rgb2.pt holds a rgb encoder"):
        cvtcl_eval.main(["retrieval", "--checkpoint", f"{root}/rgb.pt", "--checkpoint-flow", f"{root}/rgb2.pt",
                         "--dataset", "synthetic", "--shards", str(root)])


def test_cli_finetune_batch_checks_come_before_any_work(fake_project, monkeypatch):
    """Batch norm trains on at least 2 clips, and the train videos less the held-out ones must make
    one step: both are refused naming --batch-size, before any loader exists."""
    root, calls = fake_project
    built = []
    monkeypatch.setattr(sys.modules["cvtcl.data"], "build_pretrain_loader", lambda *a, **kw: built.append(kw))
    argv = ["finetune", "--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic", "--shards", str(root),
            "--out", str(root / "ft")]
    with pytest.raises(UsageError, match="--batch-size=1: the fine-tune trains batch norm"):
        cvtcl_eval.main([*argv, "--batch-size", "1"])
    fit = len(heldout_split(TRAIN, 0.1, 0)[0])
    with pytest.raises(UsageError, match=rf"--batch-size {fit + 1}: the fine-tune trains on {fit} videos"):
        cvtcl_eval.main([*argv, "--batch-size", str(fit + 1)])
    assert not built and all(c[3].get("videos") is None for c in calls)  # listed, never decoded


def test_cli_without_heldout_groups_stops_before_the_feature_passes(tmp_path, monkeypatch):
    """A dataset whose classes have one source group each leaves the linear probe nothing to select
    its epoch on: an error naming --shards and --split before any feature is computed."""
    videos = make_videos(num_classes=2, per_class=3, groups_per_class=1, prefix="train") + TEST
    train = [v.name for v in videos if v.name.startswith("train")]
    manifest = Manifest("synthetic", {}, ["C0", "C1", "C2"], [], videos,
                        {"1": {"train": train, "test": [v.name for v in TEST]}})
    write_json_atomic(tmp_path / "manifest.json", manifest.to_dict())
    monkeypatch.setitem(sys.modules, "cvtcl.models", types.SimpleNamespace(Encoder=lambda m, b: TinyEncoder(m)))
    monkeypatch.setattr(cvtcl_eval, "split_features", mock.Mock(side_effect=AssertionError("features computed")))
    with pytest.raises(UsageError, match=rf"--shards {tmp_path} --split 1: no held-out video"):
        cvtcl_eval.main(["linear", "--random-init", "rgb", "--dataset", "synthetic", "--shards", str(tmp_path),
                         "--out", str(tmp_path / "out")])


def test_resume_file_names_the_random_init_backbone(fake_project, monkeypatch):
    """Two fine-tunes of untrained encoders that differ only in --backbone never share a resume
    file (a rerun with the other backbone would load weights of the wrong shape)."""
    root, _ = fake_project
    monkeypatch.setitem(sys.modules, "cvtcl.models", types.SimpleNamespace(Encoder=lambda m, b: TinyEncoder(m)))
    paths = []
    for backbone in ("tiny", "s3d", "tiny"):
        args = cvtcl_eval._parser().parse_args(["finetune", "--random-init", "rgb", "--backbone", backbone,
                                                "--dataset", "synthetic", "--shards", str(root)])
        _, sources, _ = cvtcl_eval.load_encoders(args)
        paths.append(cvtcl_eval.resume_files(args, root, sources, torch.device("cpu"))["rgb"].path)
    assert paths[0] == paths[2] != paths[1]


def test_more_processes_than_videos_gather_one_process_features(monkeypatch):
    """Under torchrun with more processes than a subset has videos, the processes without a video
    encode nothing and the gathered features are still one process's."""
    from cvtcl import distributed

    alone, alone_test = cvtcl_eval.split_features({"rgb": TinyEncoder("rgb")}, fake_factory)
    world = len(TRAIN) + 3
    parts = [alone["rgb"].features[r::world] if r < len(TRAIN) else None for r in range(world)]
    test_parts = lambda world: [alone_test["rgb"].features[r::world] for r in range(world)]
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for rank in (0, world - 1):  # one process with videos in both subsets, one with none in either
        gathered = {"train": parts, "test": [alone_test if r < len(TEST) else None
                                             for r, alone_test in enumerate(test_parts(world))]}
        given = []

        def gather_objects(obj, rank=rank):  # this process's part in its place, the others' as computed alone
            given.append(obj)
            subset = "train" if len(given) == 1 else "test"
            return [obj if r == rank else part for r, part in enumerate(gathered[subset])]

        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "gather_objects", gather_objects)
        train, test = cvtcl_eval.split_features({"rgb": TinyEncoder("rgb")}, fake_factory)
        assert (given[0] is None) == (rank >= len(TRAIN)) and (given[1] is None) == (rank >= len(TEST))
        assert torch.allclose(train["rgb"].features, alone["rgb"].features, atol=1e-6)
        assert train["rgb"].names == [v.name for v in TRAIN] and test["rgb"].names == [v.name for v in TEST]


def test_trainer_monitor_then_eval_and_plot_on_real_shards(synthetic_dataset, tmp_path):
    """Real loaders, trainer and checkpoint: the kNN monitor lands in metrics.jsonl at epoch ends,
    the checkpoint evaluates through the CLI, and cvtcl-plot draws both figures."""
    from cvtcl.checkpoint import latest_checkpoint
    from cvtcl.plot import main as plot_main, read_metrics
    from cvtcl.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--preset", "smoke", f"data.root={synthetic_dataset}", f"run.out_dir={run}",
                       "loss.queue_size=8", "data.batch_size=4", "optim.epochs=2", "run.knn_every=1",
                       "run.log_every=1", "run.progress=none", "data.backend=baseline"]) == 0
    knn = [r for r in read_metrics(run / "metrics.jsonl") if "knn/R@1" in r]
    assert [r["epoch"] for r in knn] == [0, 1] and all(0 <= r["knn/R@1"] <= 100 for r in knn)
    # stopped between epoch 0's checkpoint and its kNN line (a kill; torchrun's grace): the rerun
    # resumes at epoch 1 and adds the line first (it was lost for good)
    latest_checkpoint(run).unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if "knn/" not in line))
    assert train_main(["--preset", "smoke", f"data.root={synthetic_dataset}", f"run.out_dir={run}",
                       "loss.queue_size=8", "data.batch_size=4", "optim.epochs=2", "run.knn_every=1",
                       "run.log_every=1", "run.progress=none", "data.backend=baseline"]) == 0
    again = [r for r in read_metrics(run / "metrics.jsonl") if "knn/R@1" in r]
    assert [(r["step"], r["epoch"], r["knn/R@1"]) for r in again] == [(r["step"], r["epoch"], r["knn/R@1"]) for r in knn]
    payload = cvtcl_eval.main(["retrieval", "--checkpoint", str(latest_checkpoint(run)), "--dataset", "synthetic",
                               "--shards", str(synthetic_dataset), "--backend", "baseline", "--device", "cpu",
                               "--frames-per-clip", "8", "--window-stride", "8", "--crop-size", "32"])
    assert payload["encoders"] == {"rgb": str(latest_checkpoint(run))}
    assert payload["backend"] == "baseline" and payload["versions"]["opencv"]  # the two loaders' pixels differ
    assert plot_main([str(run)]) == 0
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["curves-run.png", "retrieval-synthetic-split1.png"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(dataset, checkpoint): RGB-only synthetic shards with two source groups per class in train
    (the shared fixture has one, which leaves nothing to hold out), and a smoke-preset checkpoint."""
    from conftest import TINY_SYNTHETIC
    from cvtcl.checkpoint import latest_checkpoint
    from cvtcl.train import main as train_main
    from preprocess.cli import main as preprocess_main

    base = tmp_path_factory.mktemp("grouped")
    options = dict(zip(TINY_SYNTHETIC[::2], TINY_SYNTHETIC[1::2])) | {"--videos-per-class": "6", "--flow": "none"}
    assert preprocess_main(["synthetic", "--out", str(base / "data"), *[x for kv in options.items() for x in kv]]) == 0
    assert train_main(["--preset", "smoke", f"data.root={base / 'data'}", f"run.out_dir={base / 'run'}",
                       "loss.queue_size=8", "optim.epochs=1", "run.progress=none", "data.backend=baseline"]) == 0
    return base / "data", latest_checkpoint(base / "run")


def spy_loaders(monkeypatch):
    """Record (subset, crops, videos) of every build_eval_loader call while passing it through."""
    import cvtcl.data

    calls, real = [], cvtcl.data.build_eval_loader

    def spy(root, **kwargs):
        calls.append((kwargs["subset"], kwargs["crops"], kwargs.get("videos")))
        return real(root, **kwargs)

    monkeypatch.setattr(cvtcl.data, "build_eval_loader", spy)
    return calls


def real_cli(protocol, dataset, checkpoint, out):
    return cvtcl_eval.main([protocol, "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--shards",
                            str(dataset), "--backend", "dali", "--device", "cpu", "--frames-per-clip", "8",
                            "--window-stride", "8", "--crop-size", "32", "--epochs", "3", "--batch-size", "3",
                            "--out", str(out)])  # the fine-tune: 2 steps an epoch of the 6 train videos not held out


def sane(row, epochs):
    return 0 <= row["top1"] <= 100 and 0 <= row["heldout_top1"] <= 100 and 1 <= row["epoch"] <= epochs


def test_cli_linear_on_real_dali_loaders_selects_on_heldout_train(trained_run, tmp_path, monkeypatch):
    from preprocess.schema import load_manifest
    import cvtcl.linear_probe

    dataset, checkpoint = trained_run
    split = load_manifest(dataset).splits["1"]
    held_seen, real_train = [], cvtcl.linear_probe.train_linear_probe
    monkeypatch.setattr(cvtcl.linear_probe, "train_linear_probe",
                        lambda fit, held, *a: held_seen.append(held.names) or real_train(fit, held, *a))
    calls = spy_loaders(monkeypatch)
    payload = real_cli("linear", dataset, checkpoint, tmp_path)
    saved = json.loads(results_path(tmp_path, "linear", "synthetic", "1").read_text())
    assert saved["results"] == payload["results"] and set(saved["results"]) == {"rgb"}
    assert sane(saved["results"]["rgb"], 3)
    assert sorted(calls) == [("test", "center", None), ("train", "center", None)]
    assert len(held_seen) == 1 and held_seen[0] and set(held_seen[0]) <= set(split["train"])


def test_cli_finetune_on_real_dali_loaders_selects_on_heldout_train(trained_run, tmp_path, monkeypatch):
    from preprocess.schema import load_manifest

    import cvtcl.data

    dataset, checkpoint = trained_run
    split = load_manifest(dataset).splits["1"]
    calls = spy_loaders(monkeypatch)
    trained_on, real_train = [], cvtcl.data.build_pretrain_loader
    monkeypatch.setattr(cvtcl.data, "build_pretrain_loader",
                        lambda root, **kw: trained_on.append(kw["videos"]) or real_train(root, **kw))
    payload = real_cli("finetune", dataset, checkpoint, tmp_path)
    saved = json.loads(results_path(tmp_path, "finetune", "synthetic", "1").read_text())
    assert saved["results"] == payload["results"] and set(saved["results"]) == {"rgb"}
    assert sane(saved["results"]["rgb"], 3)
    # the train videos listed (nothing decoded), held-out scoring, the test split once at the end
    listing, (held_subset, held_crops, held), test_call = calls
    assert listing == ("train", "center", None)
    assert (held_subset, held_crops) == ("train", "center") and test_call == ("test", "ten", None)
    assert held and set(held) <= set(split["train"]) and not set(held) & set(split["test"])
    (fit,) = trained_on
    assert len(fit) == len(set(fit)) and set(fit) == set(split["train"]) - set(held)


def test_cli_finetune_rerun_resumes_and_gives_the_uninterrupted_result(trained_run, tmp_path, monkeypatch, capsys):
    """Killed in its third epoch, the same command resumes from the file it saved after the second
    one (real DALI loaders, dropout) and writes the uninterrupted run's results; the file is then gone."""
    import cvtcl.data

    dataset, checkpoint = trained_run
    whole = real_cli("finetune", dataset, checkpoint, tmp_path / "whole")
    real_build = cvtcl.data.build_pretrain_loader

    def killed_in_epoch_2(*args, **kwargs):
        loader = real_build(*args, **kwargs)
        epoch = loader.epoch
        loader.epoch = lambda e, *a: (_ for _ in ()).throw(KeyboardInterrupt) if e == 2 else epoch(e, *a)
        return loader

    with monkeypatch.context() as patch:
        patch.setattr(cvtcl.data, "build_pretrain_loader", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            real_cli("finetune", dataset, checkpoint, tmp_path / "resumed")
    (saved,) = (tmp_path / "resumed").glob("finetune-synthetic-split1-rgb-*.resume.pt")
    assert torch.load(saved, weights_only=True)["epoch"] == 2
    capsys.readouterr()
    resumed = real_cli("finetune", dataset, checkpoint, tmp_path / "resumed")
    assert f"fine-tune rgb: resumed after epoch 2 of 3 from {saved}" in capsys.readouterr().out
    assert resumed["results"] == whole["results"]
    assert not list((tmp_path / "resumed").glob("*.resume.pt"))


def test_ctrl_c_says_a_rerun_resumes_only_where_it_does(fake_project, monkeypatch, capsys):
    """Ctrl-C once the fine-tune has saved an epoch names the file and says the same command
    resumes, which it does; a retrieval, and a fine-tune stopped in its first epoch, keep nothing
    and say only that they were interrupted."""
    root, _ = fake_project
    stop_in = {"epoch": 0}

    def build_pretrain_loader(root, *, subset, modalities, batch_size, videos, **kwargs):
        loader = train_loader_of(videos, modalities[0])
        epoch = loader.epoch
        loader.epoch = lambda e, *a: (_ for _ in ()).throw(KeyboardInterrupt) if e == stop_in["epoch"] else epoch(e, *a)
        return loader

    monkeypatch.setattr(sys.modules["cvtcl.data"], "build_pretrain_loader", build_pretrain_loader)
    common = ["--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic", "--shards", str(root), "--device", "cpu"]
    finetune = ["finetune", *common, "--out", str(root / "ft"), "--epochs", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(cvtcl_eval, "extract_features", mock.Mock(side_effect=KeyboardInterrupt))
        assert cvtcl_eval.cli(["retrieval", *common, "--out", str(root / "r")]) == 130
    assert capsys.readouterr().err == "cvtcl.eval: interrupted (Ctrl-C)\n"
    assert cvtcl_eval.cli(finetune) == 130
    assert capsys.readouterr().err == "cvtcl.eval: interrupted (Ctrl-C)\n"
    stop_in["epoch"] = 1
    assert cvtcl_eval.cli(finetune) == 130
    (saved,) = (root / "ft").glob("*.resume.pt")
    assert capsys.readouterr().err == (f"cvtcl.eval: interrupted (Ctrl-C); the fine-tune's finished epochs are saved "
                                       f"in {saved}; rerun the same command to resume\n")
    stop_in["epoch"] = None
    # the same command while another process runs it: refused (the two wrote into one temporary,
    # one died with a "free space" error, and the resume file could be left damaged)
    with lock_held_elsewhere(saved.with_name(f".{saved.name}.lock")):
        assert cvtcl_eval.cli(finetune) == 2
        assert f"in use by another cvtcl.eval finetune of {saved.name} (pid 4242)" in capsys.readouterr().err
    assert cvtcl_eval.cli(finetune) == 0
    assert f"fine-tune rgb: resumed after epoch 1 of 2 from {saved}" in capsys.readouterr().out


@pytest.mark.parametrize("amp,expected", [("fp32", None), ("bf16", torch.bfloat16)])
def test_amp_runs_the_encoders_under_autocast(fake_project, monkeypatch, amp, expected):
    """--amp reaches every encoder forward of the protocol (an ambient autocast around it); the GPU's
    bf16 stands in as the CPU's here."""
    root, _ = fake_project
    seen = []
    real_features = TinyEncoder.features
    monkeypatch.setattr(TinyEncoder, "features", lambda self, x: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None) or real_features(self, x))
    monkeypatch.setattr(cvtcl_eval, "autocast_dtype", lambda setting, device: {"fp32": None, "bf16": torch.bfloat16}[setting])
    monkeypatch.setattr(cvtcl_eval, "check_arguments", lambda args: None)  # bf16 is refused off CUDA
    payload = cvtcl_eval.main(["retrieval", "--checkpoint", str(root / "rgb.pt"), "--dataset", "synthetic",
                               "--shards", str(root), "--out", str(root / "run"), "--device", "cpu", "--amp", amp])
    assert seen and set(seen) == {expected}
    assert payload["amp"] == {None: "fp32", torch.bfloat16: "bf16"}[expected]


def test_amp_setting_resolves_per_gpu(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert cvtcl_eval.autocast_dtype("auto", cpu) is None and cvtcl_eval.autocast_dtype("fp32", cuda) is None
    assert cvtcl_eval.autocast_dtype("bf16", cuda) is torch.bfloat16
    for capability, expected in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), None), ((6, 1), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert cvtcl_eval.autocast_dtype("auto", cuda) is expected


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """48 RGB videos (36 train): enough for two ranks of 4 clips per step, a held-out tenth apart."""
    from preprocess.cli import main as preprocess_main

    data = tmp_path_factory.mktemp("ddp") / "data"
    assert preprocess_main(["synthetic", "--out", str(data), "--classes", "3", "--videos-per-class", "16",
                            "--clips-per-group", "2", "--frames", "12", "--height", "32", "--width", "40",
                            "--flow", "none", "--workers", "1"]) == 0
    return data


def _eval_launch(data, out, protocol):
    """(cvtcl.eval's arguments, environment, repository root) of a small CPU evaluation."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    program = ["-m", "cvtcl.eval", protocol, "--random-init", "rgb", "--backbone", "tiny",
               "--dataset", "synthetic", "--shards", str(data), "--backend", "baseline", "--device", "cpu",
               "--frames-per-clip", "8", "--window-stride", "8", "--crop-size", "32", "--epochs", "2",
               "--batch-size", "4", "--out", str(out)]
    return program, {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, root


def _torchrun_eval(data, out, protocol="finetune", processes=2):
    import subprocess

    program, env, root = _eval_launch(data, out, protocol)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes else []
    return subprocess.run([sys.executable, *launch, *program], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.multiprocess
def test_retrieval_on_two_nodes_equals_one_process(ddp_data, tmp_path):
    """README.md's launch on several nodes, as two nodes of one process each on this machine
    (LOCAL_RANK 0 on both, RANK 0 and 1): the features are split and gathered by RANK, so the
    results are one process's, printed and written once, into an --out both nodes share."""
    from trainer_fakes import two_nodes

    one = _torchrun_eval(ddp_data, tmp_path / "one", "retrieval", processes=0)
    assert one.returncode == 0, one.stderr
    done = two_nodes(*_eval_launch(ddp_data, tmp_path / "nodes", "retrieval"))
    assert [status for status, _ in done] == [0, 0], "\n".join(log for _, log in done)
    assert sum(log.count("results: ") for _, log in done) == 1
    assert sum("features rgb train (process 1 of 2): 18 videos in " in log for _, log in done) == 1  # of 36
    results = [json.loads(next((tmp_path / d).glob("eval-*.json")).read_text())["results"] for d in ("one", "nodes")]
    assert results[0] == results[1] and len(list((tmp_path / "nodes").glob("eval-*.json"))) == 1


@pytest.mark.multiprocess
def test_retrieval_and_probe_under_torchrun_equal_one_process(ddp_data, tmp_path):
    """Each of two processes encodes every other video; the gathered features give the results of
    one process, and only the first process prints and writes."""
    for protocol in ("retrieval", "linear"):
        one, two = _torchrun_eval(ddp_data, tmp_path / f"{protocol}-1", protocol, processes=0), \
            _torchrun_eval(ddp_data, tmp_path / f"{protocol}-2", protocol)
        assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
        assert "Warning" not in two.stderr, two.stderr
        assert two.stdout.count("results: ") == 1
        assert any(line.startswith("features rgb train (process 1 of 2): 18 videos in ")  # of 36
                   for line in two.stdout.splitlines())
        results = [json.loads(next((tmp_path / f"{protocol}-{n}").glob("eval-*.json")).read_text())["results"]
                   for n in (1, 2)]
        assert results[0] == results[1]


@pytest.mark.multiprocess
def test_finetune_under_torchrun_trains_on_two_processes(ddp_data, tmp_path):
    """torchrun, two gloo ranks, the real baseline loaders, an untrained tiny encoder: DDP fine-tune
    (each rank its shard of every epoch), one line per epoch from the first process only, one
    results file, the resume file gone, no warning."""
    out = tmp_path / "out"
    done = _torchrun_eval(ddp_data, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("fine-tune rgb: epoch")]
    assert [line.split(",")[0] for line in epochs] == ["fine-tune rgb: epoch 1/2", "fine-tune rgb: epoch 2/2"]
    assert all(float(line.split("loss ")[1].split(",")[0]) > 0 for line in epochs)  # steps were taken
    (results,) = out.glob("eval-finetune-*.json")
    saved = json.loads(results.read_text())
    assert saved["processes"] == 2 and saved["batch_size"] == 4 and 0 <= saved["results"]["rgb"]["top1"] <= 100
    assert not list(out.glob("*.resume.pt"))


@pytest.mark.multiprocess
def test_finetune_under_torchrun_resumes_on_every_process(ddp_data, tmp_path):
    """A test video damaged after the data was packed stops the run at the ten-crop test, after the
    fine-tune saved its last epoch (with both processes' generators); once the shard is restored,
    the same command loads that state on both processes, trains nothing more, and writes the
    results of an uninterrupted run."""
    import random
    import shutil

    import h5py

    from preprocess.schema import load_manifest

    data = tmp_path / "data"
    shutil.copytree(ddp_data, data, ignore=shutil.ignore_patterns("raw"))
    manifest = load_manifest(data)
    victim = next(v for v in manifest.videos if v.name in set(manifest.splits["1"]["test"]))
    shard = data / f"shard-{victim.shard:05d}.h5"
    original = shard.read_bytes()
    with h5py.File(shard, "r") as h5:
        start = h5["rgb"]["bytes"].id.get_offset()
        lo, hi = h5["rgb"]["offsets"][victim.rgb_start : victim.rgb_start + 2]
    damaged = bytearray(original)
    damaged[int(start + (lo + hi) // 2)] ^= random.Random(0).randrange(1, 256)
    shard.write_bytes(bytes(damaged))
    first = _torchrun_eval(data, tmp_path / "out")
    assert first.returncode != 0 and victim.name in first.stdout + first.stderr
    (resume,) = (tmp_path / "out").glob("*.resume.pt")
    state = torch.load(resume, weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2  # both processes' generators

    shard.write_bytes(original)
    second = _torchrun_eval(data, tmp_path / "out")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fine-tune rgb: resumed after epoch 2 of 2" in second.stdout
    assert not any(line.startswith("fine-tune rgb: epoch") for line in second.stdout.splitlines())
    whole = _torchrun_eval(ddp_data, tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    got = json.loads(next((tmp_path / "out").glob("eval-finetune-*.json")).read_text())["results"]
    assert got == json.loads(next((tmp_path / "whole").glob("eval-finetune-*.json")).read_text())["results"]
