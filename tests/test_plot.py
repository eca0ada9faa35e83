"""cvtcl-plot renders non-empty PNGs of training curves and retrieval neighbours from small fakes."""

import json

import cv2
import numpy as np
import pytest

from cvtcl import plot
from cvtcl.errors import UsageError
from cvtcl.report import neighbours_path, write_results
from preprocess.schema import Manifest, VideoRecord, shard_name, write_json_atomic
from preprocess.shards import EncodedVideo, shard_entry, write_shard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, steps=12, knn_every=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for step in range(steps):
            record = {"step": step, "epoch": step // 4, "loss": 8.0 - 0.4 * step, "loss/info_nce": 6.0 - 0.3 * step,
                      "loss/ltcl": 2.0 - 0.1 * step, "top1": 5.0 * step, "lr": 1e-3, "clips_per_s": 40.0,
                      "stage": "rgb", "mining_precision": 0.3, "mining_chance": 0.2}
            if step % knn_every == knn_every - 1:
                record["knn/R@1"] = 10.0 + 5 * step
            fh.write(json.dumps(record) + "\n")
        fh.write('{"step": 12, "loss": ')  # a run killed mid-line


def test_curves_from_metrics(tmp_path):
    write_metrics(tmp_path / "run" / "stage1-rgb" / "metrics.jsonl")
    x_name, series = plot.curve_series(plot.read_metrics(tmp_path / "run" / "stage1-rgb" / "metrics.jsonl"))
    assert x_name == "step" and len(series["loss"][0]) == 12 and len(series["knn/R@1"][0]) == 3
    assert "stage" not in series and "epoch" not in series
    assert plot.main([str(tmp_path / "run")]) == 0
    written = sorted((tmp_path / "run" / "figures").iterdir())
    assert [p.name for p in written] == ["curves-stage1-rgb.png"]
    data = written[0].read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(written[0].parent.glob("*.tmp"))


def test_damaged_metrics_line_is_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot.read_metrics(path)


def toy_dataset(root, classes=3, per_class=2, size=(24, 32)):
    """Videos whose frames are flat class colours, packed by the real shard writer."""
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]
    videos = []
    for label in range(classes):
        for i in range(per_class):
            rec = VideoRecord(f"v_C{label}_g{i:02d}_c01", f"Class{label}", label, f"C{label}_g{i:02d}", 5, 25.0, *size)
            frame = np.full((*size, 3), colours[label][::-1], np.uint8)  # BGR for OpenCV
            frames = [cv2.imencode(".jpg", frame)[1].tobytes() for _ in range(5)]
            videos.append(EncodedVideo(rec, frames, None))
    root.mkdir(parents=True)
    records = write_shard(root / shard_name(0), 0, videos, [], with_flow=False)
    names = [r.name for r in records]
    manifest = Manifest("synthetic", {}, [f"Class{i}" for i in range(classes)], [shard_entry(root / shard_name(0), records)], records,
                        {"1": {"train": names[::2], "test": names[1::2]}})
    write_json_atomic(root / "manifest.json", manifest.to_dict())
    return records


def test_retrieval_figure(tmp_path):
    records = toy_dataset(tmp_path / "data")
    train, test = records[::2], records[1::2]
    payload = {
        "shards": str(tmp_path / "data"), "classes": ["Class0", "Class1", "Class2"],
        "queries": [{"name": r.name, "label": r.label} for r in test],
        "gallery": [{"name": r.name, "label": r.label} for r in train],
        "neighbours": {"rgb": [[0, 1, 2], [1, 0, 2], [0, 2, 1]], "flow": [[0, 1, 2], [1, 2, 0], [2, 1, 0]]},
    }
    write_results(neighbours_path(tmp_path / "eval", "synthetic", "1"), payload)
    written = plot.plot_run(tmp_path / "eval", num_queries=3)
    assert [p.name for p in written] == ["retrieval-synthetic-split1.png"]
    # a schedule's sub-stages evaluated alike: one figure each (they wrote one name, the last one kept)
    for stage in ("stage1-rgb", "cycle2-rgb"):
        write_results(neighbours_path(tmp_path / "runs" / stage, "synthetic", "1"), payload)
    assert [p.name for p in plot.plot_run(tmp_path / "runs", num_queries=3)] == [
        "retrieval-cycle2-rgb-synthetic-split1.png", "retrieval-stage1-rgb-synthetic-split1.png"]
    assert written[0].read_bytes().startswith(PNG_MAGIC) and written[0].stat().st_size > 10_000
    assert plot.pick_queries([0, 0, 1, 2, 2, 3], 3) == [0, 3, 5]
    assert plot.pick_queries([0, 0, 1, 2, 2], 6) == [0, 2, 3]  # more rows asked than classes


def test_nothing_to_plot_says_so(tmp_path):
    with pytest.raises(UsageError, match="nothing to plot"):
        plot.plot_run(tmp_path)
