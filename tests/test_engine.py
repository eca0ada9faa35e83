"""One optimizer step: gradients reach only the query encoder, segments are batched, the schedule, AMP choice."""

import pytest
import torch

from cvtcl import augment, engine
from cvtcl.config import apply_overrides
from cvtcl.engine import Context, StepDraws, clip_segments, encode_segments, instance_draws, instance_step, read_terms, train_step
from cvtcl.models import Encoder
from cvtcl.moco import MomentumContrast
from cvtcl.presets import get_preset
from trainer_fakes import one_thread  # noqa: F401 (autouse fixture)


def _context(*overrides):
    config = apply_overrides(get_preset("smoke"), ["loss.queue_size=8", *overrides])
    torch.manual_seed(0)
    model = MomentumContrast(Encoder(config.stage.modality, "tiny", embed_dim=16), queue_size=8)
    optimizer = torch.optim.Adam(model.query.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Context(config, model, model.query, optimizer, scaler, torch.device("cpu"), None)


def _draws(ctx, seed=0):
    return StepDraws(ctx, instance_draws(ctx.config, 4), torch.Generator().manual_seed(seed))


def _values(terms):
    return read_terms([terms])[0]


def _batch(b=4, modality="rgb", channels=3):
    g = torch.Generator().manual_seed(1)
    return {modality: torch.randn(b, 2, channels, 8, 16, 16, generator=g), "video_index": torch.arange(b),
            "group": torch.arange(b) // 2, "label": torch.zeros(b, dtype=torch.long)}


@pytest.mark.parametrize("local_queries", ["first", "all"])
def test_gradients_reach_only_the_query_encoder(local_queries):
    ctx = _context(f"loss.local_queries={local_queries}")
    out = instance_step(ctx, _batch(), _draws(ctx))
    out.loss.backward()
    assert set(out.terms) == {"loss", "loss_instance", "loss_local", "loss_temporal", "top1_instance", "top1_temporal"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.model.query.parameters())
    assert all(p.grad is None for p in ctx.model.key.parameters())
    out.enqueue()
    assert not ctx.model.queue.keys.requires_grad and ctx.model.queue.video_index[:4].tolist() == [0, 1, 2, 3]


def test_segments_are_slices_encoded_in_one_call():
    batch = _batch()
    segments = clip_segments(batch, "rgb", 4)  # [B, V, M, C, L, H, W]
    assert segments.shape == (4, 2, 4, 3, 2, 16, 16)
    torch.testing.assert_close(segments[1, 0, 2], batch["rgb"][1, 0, :, 4:6])
    calls = []
    encoder = Encoder("rgb", "tiny", embed_dim=16).eval()

    def counting(x):
        calls.append(x.shape[0])
        return encoder(x)

    with torch.no_grad():
        batched = encode_segments(counting, segments[:, 1])
        one_by_one = torch.stack([encoder(segments[:, 1, m]) for m in range(4)], dim=1)
    assert calls == [16]
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_spread_segments_from_the_loader_are_used_as_they_are():
    batch = _batch()
    batch["rgb_segments"] = torch.randn(4, 2, 4, 3, 2, 16, 16)  # segments="spread": [B, V, M, C, L, H, W]
    assert clip_segments(batch, "rgb", 4) is batch["rgb_segments"]


def test_train_step_updates_query_key_and_queue():
    ctx = _context()
    with torch.no_grad():
        for p in ctx.model.query.parameters():
            p.add_(0.5)  # query != key, so the momentum update is visible
    query_before = [p.clone() for p in ctx.model.query.parameters()]
    key_before = [p.clone() for p in ctx.model.key.parameters()]
    values = _values(train_step(ctx, _batch(), epoch=0, epoch_step=0))
    assert ctx.step == 1 and values["loss"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(query_before, ctx.model.query.parameters()))
    # One EMA update toward the query as it was BEFORE this step's optimizer update.
    for k0, q0, k1 in zip(key_before, query_before, ctx.model.key.parameters()):
        m = ctx.config.loss.momentum
        torch.testing.assert_close(k1, m * k0 + (1 - m) * q0)
    assert ctx.model.queue.video_index[:4].tolist() == [0, 1, 2, 3] and int(ctx.model.queue.ptr) == 4


def test_ltcl_off_skips_segments():
    ctx = _context("loss.ltcl_weight=0")
    out = instance_step(ctx, _batch(), _draws(ctx))
    assert set(out.terms) == {"loss", "loss_instance", "top1_instance"}


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_step_skips_its_update_and_is_named_when_read(fused):
    ctx = _context()
    ctx.optimizer = torch.optim.Adam(ctx.model.query.parameters(), lr=1e-3, fused=fused)  # fused: found_inf
    ctx.step = 41
    first = train_step(ctx, _batch(), epoch=3, epoch_step=6)
    before = [p.clone() for p in ctx.model.query.parameters()]
    batch = _batch()
    batch["rgb"][0, 0, 0, 0, 0, 0] = float("nan")
    bad = train_step(ctx, batch, epoch=3, epoch_step=7)  # no exception here: nothing is read
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.query.parameters()))  # update skipped
    assert ctx.optimizer.state[ctx.optimizer.param_groups[0]["params"][0]]["step"] == 1
    with pytest.raises(FloatingPointError, match="non-finite loss at step 43 .epoch 3, batch 7"):
        read_terms([first, bad])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_non_finite_gradients_of_a_finite_loss_skip_the_update_and_are_named(fused, clip):
    """A finite loss can give an inf or NaN gradient (bf16's conv3d backward on some CPUs did): its
    update was taken and checkpointed, and the run stopped a step later naming that step."""
    ctx = _context(f"optim.grad_clip={clip}")
    ctx.optimizer = torch.optim.Adam(ctx.model.query.parameters(), lr=1e-3, fused=fused)
    first = train_step(ctx, _batch(), epoch=0, epoch_step=0)
    before = [p.clone() for p in ctx.model.query.parameters()]
    weight = next(ctx.model.query.parameters())
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    bad = train_step(ctx, _batch(), epoch=0, epoch_step=1)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.query.parameters()))  # update skipped
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(the loss is finite\) at step 2 \(epoch 0, "
                                                 r"batch 1\): \{'loss_instance': [0-9.]+"):
        read_terms([first, bad])
    assert _values(first).keys() == {"loss", "loss_instance", "top1_instance", "loss_local", "loss_temporal",
                                     "top1_temporal"}  # the flag is not a logged term


def test_legacy_step_stops_at_once():
    ctx = _context("run.legacy_step=true")
    batch = _batch()
    batch["rgb"][0, 0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1 "):
        train_step(ctx, batch, epoch=0, epoch_step=0)


def test_learning_rate_schedule_and_amp_choice(monkeypatch):
    optim = get_preset("ucf101-stage1-rgb").optim
    assert [engine.learning_rate(optim, e) for e in (0, 249, 250, 279, 280)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert engine.amp_dtype("auto", cpu) is None and engine.amp_dtype("fp32", cuda) is None
    for setting in ("fp16", "bf16"):
        with pytest.raises(ValueError, match=f"optim.amp={setting} needs a CUDA device"):
            engine.amp_dtype(setting, cpu)
    assert engine.amp_dtype("bf16", cuda) is torch.bfloat16 and engine.amp_dtype("fp16", cuda) is torch.float16
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 0), torch.float16),
                              ((6, 1), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert engine.amp_dtype("auto", cuda) is dtype


def test_dihedral_step_sees_the_transformed_batch_and_repeats():
    seen = []

    def recording(ctx, batch, draws):
        seen.append(batch["rgb"].clone())
        return instance_step(ctx, batch, draws)

    engine.STEPS["recording"] = recording
    engine.DRAWS["recording"] = instance_draws
    try:
        runs = []
        for dihedral in ("false", "true", "true"):
            ctx = _context(f"data.dihedral={dihedral}")
            ctx.config.stage.kind = "recording"
            batch = _batch()
            runs.append(_values(train_step(ctx, batch, 0, 0))["loss"])
            assert torch.equal(batch["rgb"], _batch()["rgb"])  # the caller's batch is left as it was
    finally:
        del engine.STEPS["recording"], engine.DRAWS["recording"]
    plain, once, again = seen
    elements = augment.draw_elements(4, 2, engine.augment_generator(0, 0, 0))
    assert torch.equal(once, augment.apply_dihedral(plain, elements, flow=False))
    assert torch.equal(once, again) and runs[1] == runs[2] and runs[0] != runs[1]


def test_key_encoder_calls_split_batch_norm_on_a_gpu_and_one_call_per_group_on_the_cpu():
    """Interleaved permutations (one key-encoder call, split BatchNorms) where launches cost, i.e.
    on a GPU and on the meta device that stands for one; contiguous ones (a call per BN group,
    faster there) on the CPU."""
    from cvtcl import step_audit
    from cvtcl.distributed import DistInfo
    from cvtcl.train import build_context

    config = apply_overrides(get_preset("smoke"), [])
    interleaved = {}
    for device in ("cpu", "meta"):
        with step_audit.fused_on_meta():
            ctx = build_context(config, DistInfo(0, 0, 1, torch.device(device)))
        draws = StepDraws(ctx, instance_draws(config, 8), engine.step_generator(0, 0))
        interleaved[device] = [draws.permutation().interleaved for _ in range(2)]
    assert interleaved == {"cpu": [False, False], "meta": [True, True]}
