"""benchmarks/loader_speed.py runs end to end at CI size (no timing assertions)."""

import importlib.util
import json
from pathlib import Path

import pytest

from cvtcl.errors import UsageError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_speed.py"


def _module():
    spec = importlib.util.spec_from_file_location("loader_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_speed_runs_on_cpu(tmp_path, capsys):
    module = _module()
    out = tmp_path / "speed.json"
    report = module.main(["--device", "cpu", "--batch", "2", "--frames", "4", "--crop", "16", "--segments", "2",
                          "--steps", "2", "--warmup", "1", "--workers", "0", "--threads", "1",
                          "--gen-size", "24x32", "--json", str(out)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert line["device"].startswith("CPU") and line["versions"]["torch"]
    for backend in ("baseline", "dali"):
        res = line["results"][backend]
        assert res["frames_per_s"] > 0 and res["cpu_s_per_frame"] > 0 and res["headroom_paper"] > 0
    assert line["ratio_dali_over_baseline"] > 0
    check = line["integrity_check"]
    assert check["frames"] > 0 and check["checked_read_us_per_frame"] > 0 and check["bare_read_us_per_frame"] > 0
    assert "integrity_check_share_of_cpu" in line["results"]["dali"]
    assert line["consumption"]["paper_8x_titan_xp_frames_per_s"] == 12800


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: a whole number >= 1, got '0'"),
    (["--batch", "-1"], "argument --batch: a whole number >= 1, got '-1'"),
    (["--frames", "0"], "argument --frames: a whole number >= 1"),
    (["--warmup", "-1"], "argument --warmup: a whole number >= 0"),
    (["--steps", "0"], "argument --steps: a whole number >= 1"),
    (["--crop", "0"], "argument --crop: a whole number >= 1"),
    (["--gen-size", "0x5"], "--gen-size: sizes are HxW"),
    (["--backends", "baseline,foo"], "--backends baseline,foo: a comma list of baseline and/or dali"),
    (["--json", "{tmp}/missing/speed.json"], "the folder {tmp}/missing does not exist"),
])
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, argv, message):
    """Each was a ZeroDivisionError or OpenCV traceback, or an error row and exit 0, after the shards were written."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(UsageError, match=message.format(tmp=tmp_path)):
        _module().main(["--device", "cpu", *argv])
