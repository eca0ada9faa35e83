"""dali_pipelines/iterate.py: running DALI pipelines from torch (what the loaders' tests do not reach)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A DALI loader left in a reference cycle (as an exception's traceback leaves one); then the
# script's new loader forks its workers, and a worker collects garbage, as any worker may at its
# next allocation. Before the fix the worker collected the inherited pipeline and its __del__
# shut down the parent's native state.
GARBAGE = textwrap.dedent('''
    import gc
    import numpy as np
    from nvidia.dali import fn, pipeline_def
    from dali_pipelines.iterate import DaliStream, pipeline_kwargs

    class Source:
        def __call__(self, info):
            gc.collect()
            return [np.full((2,), info.iteration, np.int32)] * 2

    @pipeline_def
    def graph():
        return fn.external_source(source=Source(), batch=True, parallel=True, batch_info=True)

    def stream():
        kwargs = pipeline_kwargs(batch_size=2, device="cpu", device_id=None, num_threads=1, num_workers=1)
        assert kwargs["py_start_method"] == "fork"
        return DaliStream(graph(**kwargs), ["x"])

    gc.disable()  # the cycle stays garbage until a collection, as between two of Python's own
    old = stream()
    old.next(lambda: "old")
    cycle = [old]
    cycle.append(cycle)
    del old, cycle
''')

# DALI's source workers: the worker died (segfault) and the new loader failed with "Worker data
# receiving interrupted".
DALI_AFTER = GARBAGE + textwrap.dedent('''
    batches = [stream().next(lambda: "new")["x"].tolist() for _ in range(2)]
    assert gc.isenabled() is False and not gc.get_freeze_count(), "the heap was left frozen"
    print(batches)
''')

# The baseline loader's torch DataLoader workers: the worker hung, and the loader waited for it
# for good (the timeout makes that an error here).
BASELINE_AFTER = GARBAGE + textwrap.dedent('''
    from torch.utils.data import DataLoader, Dataset
    from dali_pipelines.baseline import start_workers

    class Items(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            gc.collect()
            return i

    loader = DataLoader(Items(), batch_size=2, num_workers=1, timeout=30)
    batches = [b.tolist() for b in start_workers(loader)]
    assert gc.isenabled() is False and not gc.get_freeze_count(), "the heap was left frozen"
    print(batches)
''')


@pytest.mark.multiprocess
@pytest.mark.parametrize("script, printed", [(DALI_AFTER, "[[[0, 0], [0, 0]], [[0, 0], [0, 0]]]"),
                                             (BASELINE_AFTER, "[[0, 1], [2, 3]]")], ids=["dali", "baseline"])
def test_forked_workers_never_collect_an_inherited_pipeline(script, printed):
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == printed


def test_a_worker_killed_while_the_loader_waits_raises_instead_of_waiting_for_good():
    """A DALI worker killed while idle (the OOM killer, a full /dev/shm) left the trainer waiting in
    the pool's condition variable for a worker that would never wake: no error, no exit. While
    `watch_workers` is in place such a wait ends in LoaderFailed (a semaphore wait runs signal
    handlers, as DALI's pool's is); another child that ended is no worker."""
    import multiprocessing
    import signal
    import threading
    import time

    from dali_pipelines.iterate import LoaderFailed, watch_workers

    context = multiprocessing.get_context("fork")
    waited_for = context.Semaphore(0)
    done = context.Process(target=time.sleep, args=(0,))
    done.start()
    done.join()
    worker = context.Process(target=time.sleep, args=(60,))
    worker.start()
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(LoaderFailed, match=rf"died at epoch 0 step 3 \(worker \(pid {worker.pid}\) exited "
                                           r"unexpectedly\): .*/dev/shm"):
        with watch_workers({worker.pid}, lambda: "epoch 0 step 3"):  # not `done`: no worker
            waited_for.acquire(timeout=30)  # without the watch: 30 s, and no error
    assert time.monotonic() - started < 20
    worker.join()
