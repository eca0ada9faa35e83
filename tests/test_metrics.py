"""metrics.jsonl lines, truncation on resume, TensorBoard scalars when tensorboard is importable."""

import sys
import types

from cvtcl.metrics import MetricsLogger, Window, read_metrics, truncate_metrics


class FakeWriter:
    scalars = []

    def __init__(self, log_dir, purge_step):
        self.log_dir, self.purge_step = log_dir, purge_step

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def close(self):
        pass


def test_logger_writes_jsonl_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n')
    logger = MetricsLogger(tmp_path, enabled=True, progress="none", total_steps=20, start_step=5)
    assert logger.tensorboard.purge_step == 6  # events past the checkpoint are dropped too
    logger.log({"step": 10, "epoch": 0, "loss": 0.5, "top1_instance": 0.25})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10]  # the old step 10 was dropped
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == 0.5
    assert ("train/loss", 0.5, 10) in FakeWriter.scalars and ("train/top1_instance", 0.25, 10) in FakeWriter.scalars


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False, progress="plain", total_steps=1, start_step=0)
    logger.log({"step": 1, "epoch": 0, "loss": 1.0})
    logger.message("hello")
    logger.close()
    assert not list(tmp_path.iterdir())


def test_window_means_and_truncate(tmp_path):
    window = Window()
    window.add({"loss": 1.0}, 0.1, 0.3)
    window.add({"loss": 3.0}, 0.3, 0.3)
    assert window.means() == {"loss": 2.0} and window.steps == 2
    assert abs(window.data_seconds - 0.4) < 1e-12
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # nothing to do, no error
    assert not (tmp_path / "absent.jsonl").exists()


def test_window_leaves_undefined_values_out():
    """Stage 2 logs mining precision as NaN before the queue is full: left out, not averaged in."""
    window = Window()
    window.add({"loss": 1.0, "mining_precision": float("nan")}, 0.1, 0.1)
    window.add({"loss": 3.0, "mining_precision": 0.5}, 0.1, 0.1)
    assert window.means() == {"loss": 2.0, "mining_precision": 0.5}
    only_nan = Window()
    only_nan.add({"loss": 1.0, "mining_precision": float("nan")}, 0.1, 0.1)
    assert only_nan.means() == {"loss": 1.0}


def test_rich_bar_keeps_count_rate_and_eta_on_a_narrow_terminal(tmp_path, monkeypatch):
    import io
    import time

    from rich.console import Console

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # no TensorBoard files
    logger = MetricsLogger(tmp_path, enabled=True, progress="rich", total_steps=40, start_step=0)
    logger.bar.stop()  # render by hand below instead of on the live terminal
    for step in (1, 2, 3):  # ticks every step: rate and ETA exist before the first log record
        time.sleep(0.01)
        logger.tick(step)
    logger.log({"step": 5, "epoch": 0, "loss": 7.047, "top1_instance": 0.25, "lr": 0.001, "clips_per_s": 39.56})
    console = Console(file=io.StringIO(), width=70, force_terminal=True, color_system=None)
    console.print(logger.bar.get_renderable())
    bar, status = console.file.getvalue().splitlines()
    assert "5/40" in bar and "step/s" in bar and "eta 0:00:" in bar  # nothing squeezed out at 70 columns
    assert status.strip() == "loss=7.047 top1_instance=0.25 lr=0.001 clips_per_s=39.56"
    logger.log({"step": 8, "epoch": 0, "knn/R@1": 12.5})  # a kNN record shows its own values
    assert logger.bar.tasks[0].fields["status"] == "knn/R@1=12.5"
    logger.close()


def test_resume_truncation_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')  # killed mid-write
    truncate_metrics(path, last_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
