"""The sub-stage plan of the whole schedule and its skip / resume / --stage logic (fake trainer)."""

import pytest

from cvtcl.schedule import SubStage, cvtcl_schedule, run_schedule, select


def test_two_cycle_plan_inits_and_samplers():
    plan = cvtcl_schedule(cycles=2)
    assert [(s.name, s.modality, s.init, s.sampler) for s in plan] == [
        ("stage1-rgb", "rgb", None, None),
        ("stage1-flow", "flow", None, None),
        ("cycle1-rgb", "rgb", "stage1-rgb", "stage1-flow"),
        ("cycle1-flow", "flow", "stage1-flow", "cycle1-rgb"),  # flow mines from the *new* rgb
        ("cycle2-rgb", "rgb", "cycle1-rgb", "cycle1-flow"),
        ("cycle2-flow", "flow", "cycle1-flow", "cycle2-rgb"),
    ]
    assert [s.cycle for s in plan] == [0, 0, 1, 1, 2, 2]
    assert [s.is_cotraining for s in plan] == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="order of"):
        cvtcl_schedule(modalities=("rgb", "depth"))


def test_select_names_the_valid_stages():
    plan = cvtcl_schedule(cycles=1)
    assert select(plan, "cycle1-flow") == [plan[3]]
    with pytest.raises(ValueError, match="stage1-rgb"):
        select(plan, "cycle9-rgb")


class FakeTrainer:
    """Marks a run complete by writing `done`; can be told to stop early (like SIGTERM) once."""

    def __init__(self, stop_in=None):
        self.calls, self.stop_in = [], stop_in

    def run_one(self, run):
        self.calls.append((run.stage.name, run.init_checkpoint, run.sampler_checkpoint))
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if run.stage.name == self.stop_in:
            self.stop_in = None
            return
        (run.run_dir / "done").write_text("1")

    @staticmethod
    def is_complete(run_dir):
        return (run_dir / "done").exists()

    @staticmethod
    def final(run_dir):
        return run_dir / "last.pt"

    def run(self, root, only=None, plan=None):
        return run_schedule(plan or cvtcl_schedule(cycles=2), root, self.run_one, self.is_complete, self.final,
                            only=only, log=lambda _: None)


def test_runs_in_order_with_latest_weights(tmp_path):
    trainer = FakeTrainer()
    trainer.run(tmp_path)
    assert trainer.calls[2] == ("cycle1-rgb", tmp_path / "stage1-rgb/last.pt", tmp_path / "stage1-flow/last.pt")
    assert trainer.calls[5] == ("cycle2-flow", tmp_path / "cycle1-flow/last.pt", tmp_path / "cycle2-rgb/last.pt")
    assert len(trainer.calls) == 6
    assert trainer.run(tmp_path) == []  # everything complete: a rerun does nothing


def test_stop_inside_a_stage_then_rerun_resumes_there(tmp_path):
    trainer = FakeTrainer(stop_in="cycle1-flow")
    ran = trainer.run(tmp_path)
    assert [r.stage.name for r in ran][-1] == "cycle1-flow" and len(ran) == 4  # nothing after the stop
    trainer.calls.clear()
    trainer.run(tmp_path)
    assert [c[0] for c in trainer.calls] == ["cycle1-flow", "cycle2-rgb", "cycle2-flow"]


def test_single_stage_needs_its_dependencies(tmp_path):
    trainer = FakeTrainer()
    with pytest.raises(FileNotFoundError, match="--stage stage1-rgb"):
        trainer.run(tmp_path, only="cycle1-rgb")
    trainer.run(tmp_path, only="stage1-rgb")
    trainer.run(tmp_path, only="stage1-flow")
    trainer.run(tmp_path, only="cycle1-rgb")
    assert [c[0] for c in trainer.calls] == ["stage1-rgb", "stage1-flow", "cycle1-rgb"]
    bad = [SubStage("stage1-rgb", "rgb"), SubStage("cycle1-rgb", "rgb", init="nowhere")]
    with pytest.raises(ValueError, match="'nowhere'"):
        trainer.run(tmp_path / "other", plan=bad)
