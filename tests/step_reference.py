"""Twenty CPU training steps of each stage, summarised: what `tests/fixtures/step_reference.json` holds.

The fixture was recorded from the trainer as it was before the sync-free step (issue 11, commit
6122a8d, this file copied into an export of it) with
`python tests/step_reference.py tests/fixtures/step_reference.json`; test_step_reference.py
runs the same steps with the current code and compares. Batch 8: the key encoder now runs its
BN groups in one call, so its projection head multiplies 2x as many rows at once; with 2 rows
per group (batch 4) the CPU BLAS picks another kernel for 2 rows than for 4 and results differ
in the last bit, with 4 or more rows per group they are bitwise equal. The summary is every metrics.jsonl
field except timings and memory, and per tensor of the final checkpoint (model buffers and
parameters, optimizer state) its float64 sum and sum of squares, written with repr-exact floats.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_fakes import FakePretrainLoader, make_dataset  # noqa: E402

TIMING_FIELDS = {"clips_per_s", "data_s", "compute_s", "data_wait_fraction", "peak_memory_gib"}
COMMON = ["--preset", "smoke", "data.batch_size=8", "loss.queue_size=16", "run.progress=none", "optim.epochs=10",
          "run.max_steps=20", "run.log_every=3", "run.checkpoint_every=1000"]


def _sampler_checkpoint(path: Path) -> Path:
    """A flow encoder checkpoint (seeded) for stage 2's frozen sampler."""
    from cvtcl.checkpoint import save_checkpoint
    from cvtcl.models import Encoder
    from cvtcl.moco import MomentumContrast

    torch.manual_seed(1)
    encoder = Encoder("flow", "tiny", 128)
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "model": MomentumContrast(encoder, 16).state_dict(),
             "optimizer": {}, "scaler": {}, "encoder": encoder.config(), "config": {}, "complete": True}
    return save_checkpoint(path, state)


def _tensors(prefix: str, value, out: dict[str, list[float]]) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype in (torch.int64, torch.int32):
            t = value.detach().double()
            out[prefix] = [float(t.sum()), float((t * t).sum())]
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _tensors(f"{prefix}.{i}", item, out)


def summarise(run_dir: Path) -> dict:
    from cvtcl.checkpoint import latest_checkpoint, load_checkpoint
    from cvtcl.metrics import read_metrics

    state = load_checkpoint(latest_checkpoint(run_dir))
    sums: dict[str, list[float]] = {}
    _tensors("model", state["model"], sums)
    _tensors("optimizer", state["optimizer"]["state"], sums)
    metrics = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run_dir / "metrics.jsonl")]
    return {"step": state["step"], "metrics": metrics, "tensors": sums}


def run_stages(root: Path, *extra: str) -> dict[str, dict]:
    """{"stage1": summary, "stage2": summary} of 20 steps each from a fresh run directory."""
    from cvtcl.train import main

    data = make_dataset(root / "data")
    sampler = _sampler_checkpoint(root / "sampler")
    runs = {
        "stage1": [],
        "stage2": ["stage.kind=cotrain", f"stage.sampler_checkpoint={sampler}"],
    }
    out = {}
    for name, overrides in runs.items():
        run_dir = root / name
        args = [*COMMON, f"data.root={data}", f"run.out_dir={run_dir}", *overrides, *extra]
        assert main(args, build_loader=FakePretrainLoader) == 0
        out[name] = summarise(run_dir)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        record = run_stages(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(record, indent=0) + "\n")
