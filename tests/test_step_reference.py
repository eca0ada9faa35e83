"""Twenty CPU steps of stage 1 and stage 2 log the same metrics and end with the same weights,
optimizer state and queue as the trainer before the sync-free step (tests/step_reference.py).

Bitwise: every logged value and every tensor checksum is compared with ==, for the default step
(permutations drawn ahead, device-side queue pointer, one-call split BatchNorm for the keys,
terms read once per log window, device-side non-finite skip) and for run.legacy_step. Two things
changed by design and are not compared: num_batches_tracked is gone (nothing reads it), and the
key encoder's BN running statistics are the query's (keys are always computed with batch
statistics, so they were never read; see MomentumContrast.momentum_update).
"""

import json
from pathlib import Path

import pytest
import torch

from step_reference import run_stages
from trainer_fakes import one_thread  # noqa: F401 (autouse fixture)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "step_reference.json"


@pytest.fixture(scope="module", params=["default", "legacy"])
def current(request, tmp_path_factory):
    # recorded with one thread; the module fixture runs before the autouse one_thread fixture
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    extra = ["run.legacy_step=true"] if request.param == "legacy" else []
    try:
        yield run_stages(tmp_path_factory.mktemp("reference"), *extra)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_twenty_steps_match_the_recorded_reference(current, stage):
    expected, got = json.loads(FIXTURE.read_text())[stage], current[stage]
    assert got["step"] == expected["step"] == 20
    assert got["metrics"] == expected["metrics"]
    wanted, tensors = (_compared(x["tensors"]) for x in (expected, got))
    assert sorted(tensors) == sorted(wanted)
    mismatched = [k for k in wanted if tensors[k] != wanted[k]]
    assert not mismatched, f"{len(mismatched)} tensors differ, first: {mismatched[:5]}"


def _compared(tensors):
    return {k: v for k, v in tensors.items()
            if not k.endswith("num_batches_tracked") and not (k.startswith("model.key.") and ".running_" in k)}
