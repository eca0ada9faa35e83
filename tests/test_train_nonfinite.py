"""A non-finite loss in the trainer: the step's update is skipped on the device, and the run stops
at the next log step naming the first bad step, before any checkpoint could hold it."""

import pytest
import torch

from cvtcl.checkpoint import latest_checkpoint, load_checkpoint
from cvtcl.train import main
from trainer_fakes import FakePretrainLoader, make_dataset, one_thread  # noqa: F401 (autouse fixture)


class NanAtStep3(FakePretrainLoader):
    def epoch(self, epoch, start_step=0):
        for step, batch in enumerate(super().epoch(epoch, start_step), start_step):
            if epoch == 0 and step == 2:
                batch["rgb"][0, 0, 0, 0, 0, 0] = float("nan")
            yield batch


def test_non_finite_loss_stops_at_the_next_log_step(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = ["--preset", "smoke", f"data.root={data}", f"run.out_dir={tmp_path / 'run'}", "loss.queue_size=16",
            "run.progress=none", "optim.epochs=10", "run.log_every=4", "run.checkpoint_every=2", "run.max_steps=8"]
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(epoch 0, batch 2\)"):
        main(args, build_loader=NanAtStep3)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 2  # step 2's checkpoint; the one at step 4 would have held the bad step
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
