"""The whole CVTCL schedule at smoke size on the given device: a check, not a timing.

Stage 1 (rgb, flow) and two co-training cycles on toy shards with the production trainer
(`cvtcl.train.main`, preset smoke-cvtcl, mixed precision where the device has it, dihedral copies
on), so that stage-2 code paths that only a GPU exercises (autocast, tensors that must share a
device) run once per GPU session. Prints one JSON line naming the device and versions (also written
to --json): every sub-stage complete, the last co-training step's logged terms, seconds.

    python benchmarks/schedule_check.py --device cuda --json out.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ArgumentParser, check_device, header, json_path, run_script, write_toy_shards  # noqa: E402
from cvtcl.checkpoint import is_complete  # noqa: E402
from cvtcl.distributed import resolve_device  # noqa: E402
from cvtcl.metrics import read_metrics  # noqa: E402
from cvtcl.schedule import cvtcl_schedule  # noqa: E402
from cvtcl.train import main as train  # noqa: E402
from preprocess.schema import write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="run.device: auto, cpu or cuda")
    parser.add_argument("--json", type=json_path, default=None, help="write the record here")
    args = parser.parse_args(argv)
    check_device(args.device, auto=True)  # before the toy shards and three sub-stages' setup
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_toy_shards(Path(tmp) / "shards", size="24x32", num_videos=16, frames=8, with_flow=True)
        runs = Path(tmp) / "runs"
        code = train(["--preset", "smoke-cvtcl", f"data.root={data}", f"run.out_dir={runs}", f"run.device={args.device}",
                      "optim.amp=auto", "data.dihedral=true", "loss.queue_size=8", "run.progress=none"])
        stages = [s.name for s in cvtcl_schedule(2)]
        complete = {name: is_complete(runs / name) for name in stages}
        last = read_metrics(runs / stages[-1] / "metrics.jsonl")
    record = {**header("schedule_check", resolve_device(args.device)), "check": "schedule", "exit_code": code,
              "complete": complete, "last_record": last[-1] if last else None, "seconds": time.time() - started}
    if code != 0 or not all(complete.values()):
        record["error"] = "the schedule did not finish every sub-stage"
    if args.json:
        write_json_atomic(args.json, record)
    print(json.dumps(record))
    return 0 if "error" not in record else 1


if __name__ == "__main__":
    sys.exit(run_script("schedule_check.py", main))
