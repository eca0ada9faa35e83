"""run.compile=graph|step's captured step (cvtcl/graphed.py), with the CUDA capture swapped for
`cvtcl.capture.recorded_capture`: the recorded aten ops replayed without the Python around them, as a CUDA graph
replays its kernels. The replayed steps (batch and draws copied in, terms copied out, recapture
when the learning rate or the queue's fill changes, the host count of the queue) equal the eager
steps bitwise, so the step reads nothing on the host that changes from step to step."""

import gc
import weakref

import pytest
import torch

from cvtcl import engine, graphed
from cvtcl.capture import recorded_capture
from cvtcl.config import apply_overrides
from cvtcl.distributed import DistInfo
from cvtcl.engine import read_terms, train_step
from cvtcl.presets import get_preset
from cvtcl.train import build_context
from step_reference import _sampler_checkpoint
from trainer_fakes import bake_a_host_value_into_the_step, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(autouse=True)
def gpu_draws(monkeypatch):
    """Graphs run on a GPU, whose step encodes each input's keys in one key-encoder call with split
    BatchNorms (interleaved permutations; the CPU makes one call per BN group)."""
    monkeypatch.setattr(engine, "split_key_batch_norm", lambda device: True)


def _run(overrides, steps, graph, lr_change_at=None, frames=4, crop=16, scope="step", dist=None):
    config = apply_overrides(get_preset("smoke"), [f"data.frames_per_clip={frames}", f"data.crop_size={crop}",
                                                   "data.num_segments=2", *overrides])
    dist = dist or DistInfo(0, 0, 1, torch.device("cpu"))
    ctx = build_context(config, dist)
    # the GPU's optimizer: fused Adam, which skips a non-finite step on the device (found_inf);
    # the CPU default decides that on the host, which a capture cannot hold
    ctx.optimizer = torch.optim.Adam(ctx.model.query.parameters(), lr=1e-3, fused=True)
    if graph:
        ctx.graph = graphed.GraphState(recorded_capture, scope)
    losses = []
    for i in range(steps):
        if i == lr_change_at:
            ctx.optimizer.param_groups[0]["lr"] = 1e-4
        g = torch.Generator().manual_seed(i * dist.world_size + dist.rank)  # each process its own clips
        batch = {m: torch.randn(4, 2, c, frames, crop, crop, generator=g) for m, c in (("rgb", 3), ("flow", 2))}
        first = 4 * (i * dist.world_size + dist.rank)
        batch |= {"video_index": torch.arange(4) + first, "group": torch.arange(4), "label": torch.arange(4) % 2}
        losses.append(read_terms([train_step(ctx, batch, 0, i)])[0])
    return losses, _state(ctx), ctx


def _state(ctx) -> list[torch.Tensor]:
    """Everything a step writes: weights, BN statistics, queues, Adam's moments and step counts."""
    optimizer = [t for state in ctx.optimizer.state.values() for t in state.values()]
    return [t.detach().clone() for t in [*ctx.model.state_dict().values(), *optimizer]]


def test_replayed_stage1_step_equals_the_eager_step():
    eager, eager_weights, _ = _run(["loss.queue_size=8"], 10, graph=False, lr_change_at=5)
    replayed, weights, ctx = _run(["loss.queue_size=8"], 10, graph=True, lr_change_at=5)
    assert replayed == eager
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    assert ctx.graph.error is None and [key[0] for key in ctx.graph.captures] == [(1e-3,), (1e-4,)]  # recaptured


def test_replayed_stage2_step_recaptures_when_the_queue_fills(tmp_path):
    sampler = _sampler_checkpoint(tmp_path / "sampler")
    overrides = ["stage.kind=cotrain", f"stage.sampler_checkpoint={sampler}", "loss.queue_size=24",
                 "model.embed_dim=128"]
    eager, eager_weights, _ = _run(overrides, 11, graph=False)
    replayed, weights, ctx = _run(overrides, 11, graph=True)
    assert repr(replayed) == repr(eager) and [v["queue_full"] for v in replayed] == [0.0] * 6 + [1.0] * 5
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    assert [key[1] for key in ctx.graph.captures] == [False, True]  # warm-up graph, then the training one
    assert ctx.model.queue.is_full and ctx.model.queue._count_on_host == 24


@pytest.mark.parametrize("scope", ["step", "calls"])
def test_a_finished_run_frees_its_graph_without_the_cycle_collector(scope):
    """On a GPU a graph holds its memory pool: a schedule's next sub-stage must not start while the
    previous one's model, optimizer and graph wait, alive, for the cycle collector."""
    gc.collect()
    gc.disable()
    try:
        _, _, ctx = _run(["loss.queue_size=8"], 5, graph=True, scope=scope)
        graphs = ctx.graph.step if scope == "step" else next(iter(ctx.graph.calls.graphs.values()))
        assert graphs is not None
        alive = {name: weakref.ref(obj) for name, obj in
                 (("context", ctx), ("model", ctx.model), ("optimizer", ctx.optimizer), ("graph", graphs))}
        del ctx, graphs
        assert [name for name, ref in alive.items() if ref() is not None] == []
    finally:
        gc.enable()


def test_not_used_off_cuda_or_where_it_cannot_hold(monkeypatch):
    config = apply_overrides(get_preset("smoke"), ["run.compile=none"])
    ctx = build_context(config, DistInfo(0, 0, 1, torch.device("cpu")))
    assert graphed.scope(ctx) is None
    ctx.device = torch.device("cuda", 0)  # as if on a GPU: run.compile=none, legacy or fp16 still keep it off
    assert graphed.scope(ctx) is None
    for captured in ("graph", "step"):  # the eager step captured, or with compiled encoders
        ctx.config.run.compile = captured
        assert graphed.scope(ctx) == "step"
    monkeypatch.setattr(graphed.distributed, "world_size", lambda: 8)  # under torchrun: the collectives stay out
    assert graphed.scope(ctx) is None  # run.compile=step: compiled encoders, no graph
    ctx.config.run.compile = "graph"
    assert graphed.scope(ctx) == "calls"
    ctx.config.run.legacy_step = True
    assert graphed.scope(ctx) is None


def test_graph_mode_captures_the_eager_encoders():
    """run.compile=graph: no torch.compile (no compile wait), a capturable optimizer and no autocast
    cache on CUDA, as for run.compile=step; only `step` and `encoder` compile the encoders."""
    compiled = {}
    for setting in ("graph", "step", "encoder", "none"):
        config = apply_overrides(get_preset("smoke"), [f"run.compile={setting}"])
        ctx = build_context(config, DistInfo(0, 0, 1, torch.device("cpu")))
        compiled[setting] = [getattr(m, "_compiled_call_impl", None) is not None for m in (ctx.model.query, ctx.model.key)]
        assert config.run.captures_step == (setting in ("graph", "step"))
    assert compiled == {"graph": [False, False], "step": [True, True], "encoder": [True, True], "none": [False, False]}


def test_a_host_value_that_changes_per_step_breaks_the_replay(monkeypatch):
    """The stand-in can fail: a loss scaled by a host count is baked into the capture, so the
    replayed steps leave the eager ones (a CUDA graph would do the same)."""
    bake_a_host_value_into_the_step(monkeypatch)
    _, eager_weights, _ = _run(["loss.queue_size=8"], 6, graph=False)
    _, weights, ctx = _run(["loss.queue_size=8"], 6, graph=True)
    assert ctx.graph.error is None and not all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


def test_the_stand_in_keeps_alive_only_what_a_cuda_graph_keeps():
    """A replay reads the memory of the tensors made outside its capture, not their values at
    capture (a buffer refilled in place is read anew), and raises once one of them has been freed,
    where a CUDA graph would read memory given to something else."""
    kept, passed = torch.ones(3), [torch.full((3,), 2.0)]
    replay, outputs = recorded_capture(lambda: kept * passed[0] + 1)
    kept.fill_(3.0)
    replay()
    assert outputs().tolist() == [7.0] * 3
    passed[0] = torch.full((3,), 5.0)  # a new tensor each time: the replay reads the freed first one
    with pytest.raises(RuntimeError, match=r"made outside its capture \(\(3,\) torch.float32\) that has been freed"):
        replay()


def test_a_failed_cuda_capture_gives_back_the_stream_it_started_on(monkeypatch):
    """torch.cuda.graph ends the capture before it leaves its side stream, so when ending raises (an
    op the capture could not hold) that stream stays current; cuda_capture restores the caller's,
    where the eager fallback and the next batch's copies run. torch.cuda's stream calls are faked."""
    from cvtcl import capture

    current = ["default"]

    class Graph:  # torch.cuda.graph's order: the side stream on entry, capture_end before leaving it
        def __init__(self, graph, pool=None, capture_error_mode="global"):
            pass

        def __enter__(self):
            current[0] = "capture stream"

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    with pytest.raises(RuntimeError, match="during capture"):
        capture.cuda_capture(lambda: None)
    assert current == ["default"]


def test_a_host_read_in_the_step_fails_the_capture_and_training_goes_on_eagerly(monkeypatch):
    real = engine.STEPS["instance"]

    def step_with_a_host_read(ctx, batch, draws):
        out = real(ctx, batch, draws)
        if float(out.loss.detach()) > 1e9:  # a sync: refused while a CUDA graph is captured
            raise AssertionError("unreachable")
        return out

    monkeypatch.setitem(engine.STEPS, "instance", step_with_a_host_read)
    eager, eager_weights, _ = _run(["loss.queue_size=8"], 6, graph=False)
    replayed, weights, ctx = _run(["loss.queue_size=8"], 6, graph=True)
    assert "not permitted while a CUDA graph is captured" in ctx.graph.error and ctx.graph.step is None
    assert replayed == eager and all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


@pytest.mark.parametrize("scope", ["step", "calls"])
def test_a_capture_that_fails_in_a_training_run_is_said_once(tmp_path, monkeypatch, capsys, scope):
    """The loop went on eagerly after a failed capture and said nothing: the user saw a slow run."""
    from cvtcl.train import main
    from trainer_fakes import FakePretrainLoader, graphs_on_cpu, make_dataset, smoke_args

    graphs_on_cpu(monkeypatch)

    def fails(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed.GraphedStep if scope == "step" else graphed.CallGraph, "__init__", fails)
    args = smoke_args(make_dataset(tmp_path / "data"), tmp_path / "run", "run.max_steps=7", "run.compile=graph",
                      f"run.graph_scope={scope}", "run.progress=none")
    assert main(args, build_loader=FakePretrainLoader) == 0
    said = capsys.readouterr().err
    assert said.count("the CUDA graph capture failed") == 1, said
    assert (f"run.compile=graph: the CUDA graph capture failed at step {graphed.WARMUP_STEPS + 1} (RuntimeError: "
            "operation not permitted when stream is capturing); training goes on with the eager step") in said, said


def test_replayed_s3d_step_equals_the_eager_step():
    """The real backbone (S3D at 16x32x32: its BatchNorms update running statistics in place)."""
    overrides = ["model.backbone=s3d", "loss.queue_size=8"]
    eager, eager_state, _ = _run(overrides, 6, graph=False, frames=16, crop=32)
    replayed, state, ctx = _run(overrides, 6, graph=True, frames=16, crop=32)
    assert replayed == eager and all(torch.equal(a, b) for a, b in zip(state, eager_state))
    assert ctx.graph.error is None and len(ctx.graph.captures) == 1


def test_compiling_on_a_gpu_too_old_for_triton_is_refused(monkeypatch):
    from cvtcl.engine import compile_encoders

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    ctx = build_context(apply_overrides(get_preset("smoke"), []), DistInfo(0, 0, 1, torch.device("cpu")))
    for setting in ("encoder", "step"):
        with pytest.raises(ValueError, match=f"run.compile={setting} needs .* 7.0 or newer.*this one is 6.1"):
            compile_encoders(ctx.model, setting, torch.device("cuda", 0))
    compile_encoders(ctx.model, "graph", torch.device("cuda", 0))  # no compiler: fine on any GPU


# --- run.graph_scope=calls: each encoder call its own graphs (torchrun's; one process in these tests) ---

# the query's clip and segments in one call; the key's clip and its segments one call each (split
# BatchNorms on one GPU, or across ranks under torchrun)
CALLS_PER_STEP = 3
EMBEDS_PER_STEP = 4  # inputs encoded


@pytest.mark.parametrize("split", [True, False], ids=["split-batch-norm", "a-key-call-per-bn-group"])
def test_per_call_graphs_equal_the_eager_step(monkeypatch, split):
    """Each encoder call replays its forward (and, for the query, backward) graph, the losses,
    Adam, the EMA and the enqueue eager around them: bitwise the eager steps, each call captured
    once (a learning-rate change is outside every graph), and no encoder Python after the capture.
    Split: the key encoder's BatchNorms read the affine the EMA repeats for their groups each step,
    from the memory the capture saw. Not split (a batch the BN groups do not divide): two key
    calls per input."""
    from cvtcl.models import Encoder

    monkeypatch.setattr(engine, "split_key_batch_norm", lambda device: split)
    eager, eager_weights, _ = _run(["loss.queue_size=8"], 8, graph=False, lr_change_at=5)
    embed, runs = Encoder.embed, []
    monkeypatch.setattr(Encoder, "embed", lambda self, x: runs.append(len(x)) or embed(self, x))
    replayed, weights, ctx = _run(["loss.queue_size=8"], 8, graph=True, lr_change_at=5, scope="calls")
    assert replayed == eager and all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    assert ctx.graph.error is None and ctx.graph.step is None
    # per encoder: its i-th call
    assert sorted(key[0] for key in ctx.graph.captures) == ([1, 1, 2] if split else [1, 1, 2, 3, 4])
    assert [len(key) for key in ctx.graph.captures if key[-2]] == [5]  # the query's one call of 2 inputs trains
    embeds = EMBEDS_PER_STEP if split else EMBEDS_PER_STEP + 2
    assert len(runs) == (graphed.WARMUP_STEPS + 1) * embeds  # eager warm-up, then the captures only


def test_a_host_value_in_an_encoder_call_breaks_its_replay(monkeypatch):
    """The stand-in can fail here too: an encoder whose output depends on a host count is replayed
    with the count of its capture, and the steps leave the eager ones."""
    from cvtcl.models import Encoder

    embed, count = Encoder.embed, [0]

    def embed_with_a_host_count(self, x):
        count[0] += 1
        return embed(self, x) * (1 + count[0] // EMBEDS_PER_STEP % 2)  # 1 in one step, 2 in the next

    monkeypatch.setattr(Encoder, "embed", embed_with_a_host_count)
    _, eager_weights, _ = _run(["loss.queue_size=8"], 6, graph=False)
    count[0] = 0
    _, weights, ctx = _run(["loss.queue_size=8"], 6, graph=True, scope="calls")
    assert ctx.graph.error is None and not all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


def test_per_call_graphs_of_stage2_equal_the_eager_step(tmp_path):
    """Stage 2: the frozen sampler's calls are graphed too; the queue filling up changes nothing
    inside a call's graphs (captured once each)."""
    sampler = _sampler_checkpoint(tmp_path / "sampler")
    overrides = ["stage.kind=cotrain", f"stage.sampler_checkpoint={sampler}", "loss.queue_size=24",
                 "model.embed_dim=128"]
    eager, eager_weights, _ = _run(overrides, 11, graph=False)
    replayed, weights, ctx = _run(overrides, 11, graph=True, scope="calls")
    assert repr(replayed) == repr(eager) and [v["queue_full"] for v in replayed] == [0.0] * 6 + [1.0] * 5
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    assert ctx.graph.error is None and len(ctx.graph.captures) == len(set(ctx.graph.captures))
    assert any(key[-2] is False and key[-1] is False for key in ctx.graph.captures)  # the sampler: no grad, eval mode
    # the query's training call, first met at step 7 (after the no-grad warm-up), ran eagerly in
    # steps 7-9 (cuDNN autotunes the backward there, not in a capture) and was captured at step 10
    assert [key[-2] for key in ctx.graph.captures].count(True) == 1
    assert set(ctx.graph.calls.seen.values()) == {graphed.WARMUP_STEPS}


def test_per_call_graphs_of_s3d_equal_the_eager_step():
    overrides = ["model.backbone=s3d", "loss.queue_size=8"]
    eager, eager_state, _ = _run(overrides, 5, graph=False, frames=16, crop=32)
    replayed, state, ctx = _run(overrides, 5, graph=True, frames=16, crop=32, scope="calls")
    assert replayed == eager and all(torch.equal(a, b) for a, b in zip(state, eager_state))
    assert ctx.graph.error is None and len(ctx.graph.captures) == CALLS_PER_STEP


def test_encoders_outside_the_step_and_their_copies_call_eagerly():
    """A kNN check between steps (other shapes, eval mode) neither captures nor replays; a copy
    of an encoder (features.py's batch-norm copy) carries no graphs."""
    import copy

    _, _, ctx = _run(["loss.queue_size=8"], 5, graph=True, scope="calls")
    captured = len(ctx.graph.captures)
    query = ctx.model.query.eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 4, 16, 16)
        assert torch.equal(query(x), query.embed(x))
    assert len(ctx.graph.captures) == captured and copy.deepcopy(query).graphs is None
    ctx.graph.release()
    assert ctx.model.query.graphs is None and ctx.model.key.graphs is None


@pytest.mark.multiprocess
def test_per_call_graphs_under_torchrun_equal_the_eager_step(tmp_path):
    """torchrun, two gloo processes, DDP: the graphed calls' gradients reach DDP's all-reduce (both
    processes end with the same weights from different clips) and equal the eager steps bitwise."""
    import json

    from trainer_fakes import torchrun_check

    done = torchrun_check("call-graphs-check", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["error"] is None and result["captures"] == CALLS_PER_STEP
        assert result["losses_equal"] and result["weights_equal"]
    assert results[0]["weights"] == results[1]["weights"] and results[0]["losses"] != results[1]["losses"]


def test_graph_scope_settings_that_cannot_hold_are_refused_before_any_work(tmp_path):
    from cvtcl import preflight

    with pytest.raises(ValueError, match="run.graph_scope=calls graphs the eager encoders' calls, with run.compile=graph"):
        apply_overrides(get_preset("smoke"), ["run.compile=step", "run.graph_scope=calls"])
    config = apply_overrides(get_preset("smoke"), ["run.compile=graph", "run.graph_scope=step", "loss.queue_size=64",
                                                   f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"under torchrun \(WORLD_SIZE=8\) would hold its collectives"):
        preflight.validate(config, 8)


@pytest.mark.parametrize("scope", ["step", "calls"])
def test_the_training_loop_with_graphs_trains_as_the_eager_loop(tmp_path, monkeypatch, scope):
    """cvtcl.train's loop (log steps, checkpoints, a resume that warms up and captures afresh) with
    the step's graphs (stand-in captures, the GPU's fused Adam): the checkpoint of the eager loop, bitwise."""
    from cvtcl.checkpoint import latest_checkpoint, load_checkpoint
    from cvtcl.train import main
    from trainer_fakes import FakePretrainLoader, graphs_on_cpu, make_dataset, smoke_args

    graphs_on_cpu(monkeypatch)
    dataset = make_dataset(tmp_path / "data")
    captured = []
    capture = graphed.GraphedStep.__init__ if scope == "step" else graphed.CallGraph.__init__
    monkeypatch.setattr(graphed.GraphedStep if scope == "step" else graphed.CallGraph, "__init__",
                        lambda self, *a: captured.append(1) or capture(self, *a))

    def run(out, steps, *extra):
        args = smoke_args(dataset, out, f"run.max_steps={steps}", "run.log_every=2", "run.checkpoint_every=3", *extra)
        assert main(args, build_loader=FakePretrainLoader) == 0
        return load_checkpoint(latest_checkpoint(out))["model"]

    graphs = ["run.compile=graph", f"run.graph_scope={scope}"]
    run(tmp_path / "graphs", 7, *graphs)
    replayed = run(tmp_path / "graphs", 12, *graphs)  # resumed at step 8
    eager = run(tmp_path / "eager", 12)
    assert all(torch.equal(replayed[k], eager[k]) for k in eager), [k for k in eager if not torch.equal(replayed[k], eager[k])]
    assert len(captured) == (1 if scope == "step" else CALLS_PER_STEP) * 2  # once per launch (no lr change in 12 steps)
