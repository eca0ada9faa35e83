"""No host synchronisation on an ordinary training step, counted on the meta device (cvtcl.step_audit).

The real `train_step` of stage 1 and stage 2 runs with every tensor on the meta device, where
each op dispatches as on a GPU and nothing is computed: S3D at the paper's shapes (16 x 32 x 128^2)
costs about a second. A log step adds exactly one read (`read_terms`: the window's rows at once).
run.legacy_step, the old step kept as the benchmarks' baseline, is counted too, so the test can
fail: it syncs on every step.
"""

import pytest
import torch

from cvtcl import step_audit
from cvtcl.config import apply_overrides
from cvtcl.engine import read_terms, train_step
from cvtcl.models import Encoder
from cvtcl.presets import get_preset

META = torch.device("meta")
S3D = ["model.backbone=s3d", "data.batch_size=16", "data.frames_per_clip=32", "data.crop_size=128"]
TINY = ["model.backbone=tiny", "data.batch_size=4", "data.frames_per_clip=8", "data.crop_size=32"]


def _meta_context(overrides):
    return step_audit.meta_context(apply_overrides(get_preset("ucf101-stage1-rgb"), ["optim.amp=fp32", *overrides]))


def _batch(config):
    data, b = config.data, config.data.batch_size
    batch = {"rgb": torch.empty(b, 2, 3, data.frames_per_clip, data.crop_size, data.crop_size, device=META),
             "flow": torch.empty(b, 2, 2, data.frames_per_clip, data.crop_size, data.crop_size, device=META)}
    return batch | {k: torch.arange(b, device=META) for k in ("video_index", "group", "label")}


def _audit_steps(ctx, steps=3):
    batch = _batch(ctx.config)
    audits, terms = [], []
    for i in range(steps):
        result, record = step_audit.audit(lambda: train_step(ctx, batch, 0, i))
        terms.append(result)
        audits.append(record)
    return audits, terms


STAGE2 = ["stage.kind=cotrain", "stage.sampler_checkpoint=unused.pt", "loss.queue_size=32"]


@pytest.mark.parametrize("backbone", [S3D, TINY], ids=["s3d", "tiny"])
@pytest.mark.parametrize("stage", [[], STAGE2, ["data.dihedral=true"], [*STAGE2, "data.dihedral=true"]],
                         ids=["stage1", "stage2", "stage1-dihedral", "stage2-dihedral"])
def test_ordinary_steps_do_not_sync_and_a_log_step_reads_once(backbone, stage):
    """data.dihedral's per-step draw was a blocking copy (every step waited for the GPU)."""
    ctx = _meta_context([*backbone, "loss.queue_size=2048", *stage])
    audits, terms = _audit_steps(ctx)
    assert [a.sync_count for a in audits] == [0, 0, 0], [dict(a.syncs) for a in audits]
    assert all(a.launch_count > 100 for a in audits)
    _, log = step_audit.audit(lambda: read_terms(terms))
    assert dict(log.syncs) == {"tolist": 1}


def test_stage2_warm_up_and_training_steps_do_not_sync():
    ctx = _meta_context([*TINY, *STAGE2, "loss.queue_size=8"])  # full after 2 steps of 4
    audits, _ = _audit_steps(ctx, steps=4)
    assert [a.sync_count for a in audits] == [0, 0, 0, 0]
    assert audits[1].launch_count < audits[3].launch_count  # warm-up: no backward; then it trains


def test_legacy_step_syncs_every_step():
    ctx = _meta_context([*TINY, "loss.queue_size=2048", "run.legacy_step=true"])
    audits, _ = _audit_steps(ctx)
    # blocking copies of both permutations and the terms read (synchronize is CUDA-only); the first
    # step makes one more (one-time setup)
    assert all(dict(a.syncs) == {"blocking _to_copy": 2, "tolist": 1} for a in audits[1:]), [dict(a.syncs) for a in audits]


def test_the_counter_sees_host_reads():
    x = torch.ones(3, device=META)
    _, record = step_audit.audit(lambda: (int(x.sum()), x.nonzero(), x.tolist(), torch.ones(2).to(META),
                                          torch.cuda.synchronize(), torch.ones(2).to(META, non_blocking=True)))
    assert dict(record.syncs) == {"item": 1, "nonzero": 1, "tolist": 1, "blocking _to_copy": 1, "cuda.synchronize": 1}


def test_bytes_are_what_each_launch_reads_and_writes():
    a, b = torch.empty(1000, device=META), torch.empty(1000, device=META, dtype=torch.bfloat16)
    _, record = step_audit.audit(lambda: (a + a, a.mul_(2), b.view(10, 100), torch.empty(50, device=META)))
    # a + a: two reads of 4 kB and a new 4 kB written; in place: 4 kB read and written back; a view and
    # an allocation launch nothing
    assert record.bytes == 3 * 4000 + 2 * 4000 and record.launch_count == 2
    w = torch.empty(8, 3, 3, 3, 3, device=META)
    _, conv = step_audit.audit(lambda: torch.nn.functional.conv3d(torch.empty(2, 3, 4, 5, 5, device=META), w, padding=1))
    assert conv.bytes == 4 * (2 * 3 * 100 + w.numel() + 2 * 8 * 100)  # input, weight, output
    assert conv.flops == 2 * (2 * 8 * 100) * (3 * 27)  # two per multiply-add: each output sums 3 x 27 products


def test_split_key_encoder_launches_fewer_ops_than_the_legacy_step():
    fast, _ = _audit_steps(_meta_context([*S3D, "loss.queue_size=2048"]), steps=2)
    legacy, _ = _audit_steps(_meta_context([*S3D, "loss.queue_size=2048", "run.legacy_step=true"]), steps=2)
    assert fast[1].launch_count < 0.8 * legacy[1].launch_count
    assert "add_" not in fast[1].launches or fast[1].launches["add_"] < 50  # no num_batches_tracked += 1


@pytest.mark.parametrize("stage", [[], STAGE2], ids=["stage1", "stage2"])
def test_per_call_graphs_leave_few_launches_outside_them(stage):
    """run.graph_scope=calls (the graphs under torchrun), S3D at the paper's shapes: once the calls
    are captured, a step launches the ops between the encoder calls plus one replay per graph,
    without a sync: under a tenth of the eager step's launches. (The stand-in capture's replays
    run uncounted; each counts as one launch, as a CUDA graph's does.)"""
    from cvtcl import graphed

    ctx = _meta_context([*S3D, "loss.queue_size=2048", *stage])
    eager, _ = _audit_steps(ctx, steps=graphed.WARMUP_STEPS + 1)
    ctx.graph = graphed.GraphState(step_audit.replay_counting_capture, "calls")
    _audit_steps(ctx, steps=graphed.WARMUP_STEPS + 1)  # eager warm-up, then the captures (and their first replays)
    replayed, _ = _audit_steps(ctx, steps=2)
    assert ctx.graph.error is None and [a.sync_count for a in replayed] == [0, 0]
    assert replayed[0].launches == replayed[1].launches
    # the query's one call of clip and segments (forward, backward), the key's clip and segments, stage 2's sampler
    assert replayed[1].launches["graph replay"] == (5 if stage else 4)
    # S3D stage 1: 134 launches (4 of them replays) against 1,985 eager; stage 2: 202 (5) against 2,311 (2026-12-05)
    assert replayed[1].launch_count < 0.1 * eager[-1].launch_count, (replayed[1].launch_count, eager[-1].launch_count)


def _encoder_flops(modality: str, shape: tuple, backward: bool) -> int:
    """FLOPs of one S3D call on `shape` (and its backward to the weights, the input needing no
    gradient, as a clip's does not), counted by themselves on the meta device."""
    encoder = Encoder(modality, "s3d").to(META)
    x = torch.empty(*shape, device=META)
    with torch.set_grad_enabled(backward):
        _, record = step_audit.audit(lambda: encoder(x).sum().backward() if backward else encoder(x))
    return record.flops


@pytest.mark.parametrize("stage", [[], ["run.legacy_step=true"], STAGE2], ids=["stage1", "legacy", "stage2"])
def test_the_step_computes_what_the_algorithm_asks_and_no_more(stage):
    """The FLOPs of an ordinary S3D step at the paper's shapes (16 x 32 x 128^2, M = 4 segments of
    8 frames, the paper's one local query) equal the encoder calls the algorithm makes, each
    counted alone: the query's clip and local query forward and backward, the key's clip and its
    4 segments forward, stage 2 the sampler's clip of the other modality forward. A second key
    call, a backward through the key encoder or a missing call changes the total by 4% or more
    (one local query: 5.9 of 132 GFLOP a sample); the losses' products are the rest (< 0.1%).
    The legacy step does the same arithmetic in more launches."""
    ctx = _meta_context([*S3D, *stage, "loss.queue_size=16"])  # full after one step
    audits, _ = _audit_steps(ctx, steps=2)
    b, t, m, crop = 16, 32, 4, 128
    query = _encoder_flops("rgb", (b, 3, t, crop, crop), True) + _encoder_flops("rgb", (b, 3, t // m, crop, crop), True)
    key = _encoder_flops("rgb", (b, 3, t, crop, crop), False) + _encoder_flops("rgb", (b * m, 3, t // m, crop, crop), False)
    sampler = _encoder_flops("flow", (b, 2, t, crop, crop), False) if stage == STAGE2 else 0
    expected = query + key + sampler
    assert abs(audits[1].flops - expected) < 0.001 * expected, (audits[1].flops / b / 1e9, expected / b / 1e9)
    assert 125e9 < audits[1].flops / b < (165e9 if stage == STAGE2 else 140e9)  # 132 GFLOP a sample, stage 2 155
