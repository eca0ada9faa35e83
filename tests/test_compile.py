"""run.compile: the encoders compile as whole graphs (no graph break) and train as the eager ones do."""

import pytest
import torch

from cvtcl.checkpoint import is_complete
from cvtcl.config import apply_overrides
from cvtcl.distributed import DistInfo
from cvtcl.engine import read_terms, train_step
from cvtcl.models import Encoder, split_batch_norm
from cvtcl.moco import MomentumContrast, Permutation
from cvtcl.presets import get_preset
from cvtcl.schedule import cvtcl_schedule
from cvtcl.train import build_context, main
from trainer_fakes import FakePretrainLoader, compiling_with, make_dataset, one_thread  # noqa: F401 (autouse fixture)


def test_query_and_split_key_encoders_have_no_graph_break():
    """fullgraph=True raises at the first graph break; aot_eager traces without compiling C++."""
    torch.manual_seed(0)
    model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=16), queue_size=8)
    x = torch.randn(8, 3, 4, 16, 16)
    query = torch.compile(model.query, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(query(x), model.query(x))
    query(x).sum().backward()  # the backward graph too
    key = torch.compile(model.key, fullgraph=True, backend="aot_eager")
    perm = Permutation.draw(8, torch.Generator().manual_seed(0), torch.device("cpu"), 2)
    with torch.no_grad(), split_batch_norm(model.key, 2):
        torch.testing.assert_close(key(x[perm.order]), model.key(x[perm.order]))


def _steps(compile_setting, steps=3):
    config = apply_overrides(get_preset("smoke"), ["loss.queue_size=8", "data.frames_per_clip=4", "data.crop_size=16",
                                                   "data.num_segments=2", f"run.compile={compile_setting}"])
    ctx = build_context(config, DistInfo(0, 0, 1, torch.device("cpu")))
    g = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randn(4, 2, 3, 4, 16, 16, generator=g), "video_index": torch.arange(4),
             "group": torch.arange(4), "label": torch.arange(4)}
    losses = [read_terms([train_step(ctx, batch, 0, i)])[0]["loss"] for i in range(steps)]
    return losses, [p.detach().clone() for p in ctx.model.query.parameters()]


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_step():
    """Inductor (C++ on the CPU, minutes on 2 shared cores): same losses and weights up to the
    rounding of fused kernels. Weights: atol 2e-4, a fifth of one Adam step at lr 1e-3, because
    Adam moves a weight by about lr whatever the size of its gradient, so a near-zero gradient
    that rounds differently can move it by up to lr (measured: 7e-5 on 1 of 55,296 weights)."""
    eager_losses, eager_weights = _steps("none")
    compiled_losses, compiled_weights = _steps("encoder")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(compiled_weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


def test_the_whole_schedule_compiles_in_one_process(tmp_path, monkeypatch):
    """Every sub-stage compiles its own encoders (rgb and flow, stage 1 and co-training, with and
    without gradients, clips and segments): all `Encoder.forward`, one code object whose compiled
    entries torch.compile counts together. Were they kept across sub-stages, the schedule would
    pass dynamo's recompile limit (8) in its first co-training sub-stage, which with fullgraph=True
    stops training with FailOnRecompileLimitHit. The eager backend traces as inductor's does,
    without compiling C++."""
    monkeypatch.setattr(Encoder, "compile", compiling_with("eager"))
    dataset = make_dataset(tmp_path / "data")
    args = ["--preset", "smoke-cvtcl", f"data.root={dataset}", f"run.out_dir={tmp_path / 'run'}", "loss.queue_size=8",
            "run.progress=none", "run.keep_checkpoints=0", "run.compile=encoder"]
    assert main(args, build_loader=FakePretrainLoader) == 0
    assert all(is_complete(tmp_path / "run" / stage.name) for stage in cvtcl_schedule(2))


def test_processes_that_compile_at_once_share_the_cores(monkeypatch):
    """Under torchrun every process of a node compiles its encoders at once; each gets its share of
    the cores for inductor's compile processes (min(32, cores) each by default), in the environment
    and in inductor's config, which the trainer has imported already; the user's own value stays."""
    import os

    import torch._inductor.config as inductor_config

    from cvtcl import capture, engine

    assert capture.compile_threads(16, cpus=32) == 2 and capture.compile_threads(1, cpus=64) == 32
    assert capture.compile_threads(40, cpus=16) == 1
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    # inductor's config is patched through its own patch(): monkeypatch's undo would delete the key
    with inductor_config.patch(compile_threads=inductor_config.compile_threads):
        model = MomentumContrast(Encoder("rgb", "tiny", embed_dim=16), queue_size=8)
        engine.compile_encoders(model, "encoder", torch.device("cpu"), world_size=16)  # two nodes of 8
        assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "8" and inductor_config.compile_threads == 8
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
        capture.share_compile_threads(4)
        assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "3" and inductor_config.compile_threads == 8
    torch._dynamo.reset()  # the encoders compiled lazily here were never called: nothing to keep
