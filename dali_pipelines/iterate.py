"""Running a DALI pipeline from torch: device choice, worker start, zero-copy outputs, error reports.

docs/design.md "Loader": outputs reach torch through `DALIGenericIterator` without a copy (the pipeline
runs with `exec_dynamic=True`, so the iterator hands out DLPack views of DALI's buffers instead of
copying them into fresh tensors). Those views are valid until the next batch; the loaders copy
them once, into the [B, V, C, T, H, W] layout the model needs (the T <-> C transpose is that copy).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal

import cv2
import numpy as np

from dali_pipelines.source import CorruptFrameError


class LoaderFailed(OSError):
    """A loader's worker process died or could not share its batch: the system's doing (memory,
    shared memory, a signal), not the data's. An OSError, so the commands print it as one line."""


# what torch's DataLoader and DALI's worker pool say when a worker died or shared memory ran out
WORKER_DEATH = ("Worker data receiving interrupted", "exited unexpectedly", "killed by signal",
                "unable to allocate shared memory", "No space left on device")


def worker_died(where: str, text: str) -> LoaderFailed | None:
    """The error to raise for a loader failure `text` at `where` when a worker died (None when
    `text` is another failure): names /dev/shm's room and what to change."""
    if not any(sign in text for sign in WORKER_DEATH):
        return None
    try:
        shm = shutil.disk_usage("/dev/shm")
        room = f"/dev/shm has {shm.free / 2**20:.0f} MB free of {shm.total / 2**20:.0f} MB"
    except OSError:
        room = "no /dev/shm"
    cause = next(line.strip() for line in text.splitlines()[::-1] if any(sign in line for sign in WORKER_DEATH))
    return LoaderFailed(f"a loader worker process died at {where} ({cause[:200]}): the system ended it (memory ran out, "
                        f"a signal) or its shared memory was full ({room}; a container's default is 64 MB). Give "
                        "it more (docker run --shm-size 8g, or --ipc=host), or lower the batch size, and rerun")


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state letter, parent pid) of process `pid` from /proc, or None when it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _children() -> set[int]:
    """Pids of this process's children."""
    me = os.getpid()
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and (_stat(entry) or ("", 0))[1] == me}


def _ended(pid: int) -> bool:
    """Whether process `pid` has ended (gone, or a zombie not yet reaped)."""
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")


@contextlib.contextmanager
def watch_workers(workers: set[int], describe):
    """While the block waits on the loader's worker processes `workers`: one that ended (the OOM
    killer's SIGKILL, SIGBUS of a full /dev/shm) raises LoaderFailed in this (main) thread. A
    worker killed while idle left DALI's pool waiting in a condition variable for it for good (no
    error to report); that wait runs signal handlers, as torch's DataLoader does with its own
    SIGCHLD handler. Whether it ended is read from /proc, not by waiting for it: its pool reaps it."""
    said = []

    def on_child(signum, frame):
        ended = None if said else next((pid for pid in sorted(workers) if _ended(pid)), None)
        if ended is not None:
            said.append(ended)
            raise worker_died(describe(), f"worker (pid {ended}) exited unexpectedly")

    try:
        previous = signal.signal(signal.SIGCHLD, on_child)
    except ValueError:  # not the main thread: no handler to set
        yield
        return
    try:
        on_child(signal.SIGCHLD, None)  # one ended before the wait (during the step): no signal comes now
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def pipeline_kwargs(*, batch_size: int, device: str, device_id, num_threads: int, num_workers: int,
                    seed: int = 0) -> dict:
    """Arguments for a `@pipeline_def` function: CPU-only mode is device_id=None."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose 'cpu' or 'cuda'")
    import torch

    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
    if device == "cuda":
        if device_id is None:
            device_id = torch.cuda.current_device()
    else:
        device_id = None
    return dict(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
        exec_dynamic=True, py_num_workers=max(num_workers, 1),
        # fork is only safe before CUDA is initialised in this process; spawn always is.
        py_start_method="spawn" if device == "cuda" or cuda_live else "fork",
    )


def dali_device(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def in_flight(num_workers: int) -> int:
    """Batches the parallel source prepares ahead of the iterator: its prefetch queue depth."""
    return max(2, num_workers)


def source_kwargs(parallel: bool, prefetch: int) -> dict:
    """`fn.external_source` arguments of a batch source called with `batch_info`."""
    kwargs = {"parallel": parallel, "batch_info": True}
    if parallel:
        kwargs["prefetch_queue_depth"] = prefetch
    return kwargs


def graph_kwargs(device: str, dtype, num_workers: int) -> dict:
    """The pipeline-function arguments the loaders derive alike from their settings (with
    `pipeline_kwargs`): DALI device, output type, worker mode and prefetch depth."""
    from dali_pipelines.frames import dali_dtype

    return dict(device=dali_device(device), dtype=dali_dtype(dtype), parallel=num_workers > 0,
                prefetch=in_flight(num_workers))


def stack_clips(views, dtype, t: int, b: int, *rest: int):
    """Per-view frame batches [N = B * prod(rest) * T, C, H, W] -> one tensor [B, V, *rest, C, T, H, W]
    of `dtype` on the views' device. The T <-> C transpose is the one copy of the batch."""
    import torch

    c, h, w = views[0].shape[1:]
    out = torch.empty((b, len(views), *rest, c, t, h, w), dtype=dtype, device=views[0].device)
    for i, view in enumerate(views):
        out[:, i].copy_(view.view(b, *rest, t, c, h, w).transpose(-4, -3))
    return out


@contextlib.contextmanager
def frozen_heap(forking: bool):
    """Around a pipeline build that forks its source workers: they inherit this process's heap,
    garbage not yet collected included (a loader held in a reference cycle, as an exception's
    traceback makes one). A worker that collects an inherited DALI pipeline runs its `__del__`,
    which shuts down native state of this process: a DALI worker dies with a segfault and the
    loader fails with "Worker data receiving interrupted"; a torch DataLoader worker hangs, and
    its loader with it (dali_pipelines.baseline.start_workers). So the garbage is collected here
    first, and what is left is frozen while the workers fork (gc.freeze: a child never collects it)."""
    if not forking:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class DaliStream:
    """A built pipeline and its iterator; `next()` returns {output name: tensor view}."""

    def __init__(self, pipeline, names: list[str]):
        self.pipeline, self.names = pipeline, names
        self.iterator = None  # created on first next(): its constructor already runs the first batch
        self.workers: set[int] = set()  # the source's worker processes, once built

    def next(self, describe, locate=None) -> dict:
        """The next batch; DALI errors are re-raised naming the position (describe()) and, where
        `locate()` finds one, the corrupt frame."""
        try:
            if self.iterator is None:
                from nvidia.dali.plugin.pytorch import DALIGenericIterator

                before = _children()
                with frozen_heap(self.pipeline.py_start_method == "fork"):
                    self.pipeline.build()  # starts the source's worker processes
                self.workers = _children() - before
                self.iterator = DALIGenericIterator([self.pipeline], self.names, size=-1, auto_reset=False)
            with watch_workers(self.workers, describe):
                return next(self.iterator)[0]
        except (StopIteration, LoaderFailed):
            raise
        except Exception as err:  # DALI raises plain Exception/RuntimeError with the worker's traceback
            text = str(err)
            marker = f"{CorruptFrameError.__name__}: "
            lines = [ln for ln in text.splitlines() if marker in ln]
            if lines:  # raised by the source in a worker: keep its message, add the position
                raise CorruptFrameError(f"{describe()}: {lines[-1].split(marker, 1)[1]}") from err
            died = worker_died(describe(), text)
            if died is not None:
                raise died from err
            bad = locate() if locate else None
            where = f"; first undecodable frame: {bad}" if bad else ""
            raise RuntimeError(f"DALI pipeline failed at {describe()}{where}: {text[-2000:]}") from err

    def close(self) -> None:
        del self.iterator
        del self.pipeline


def first_undecodable(frames) -> str | None:
    """Name the first (description, JPEG bytes) pair OpenCV cannot decode; used on the error path."""
    for description, buf in frames:
        image = cv2.imdecode(np.asarray(buf), cv2.IMREAD_UNCHANGED)
        if image is None:
            return description
    return None


def locate_undecodable(clips, modalities, windows, first: int, num_workers: int) -> str | None:
    """On a DALI decode error: decode the batches that may be in flight from iteration `first` on
    with OpenCV and name the first bad frame. `windows(iteration)` yields the (VideoRecord, frame
    indices) windows of a batch; `clips` is the source's ClipReader."""
    for iteration in range(first, first + in_flight(num_workers) + 2):
        for video, frames in windows(iteration):
            for modality in modalities:
                for described in clips.described(modality, video, frames).values():
                    found = first_undecodable(described)
                    if found:
                        return found
    return None
