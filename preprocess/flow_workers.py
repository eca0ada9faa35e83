"""Flow workers: batched flow on the GPUs for pairs of many videos, CPU workers around them.

With `--flow-device cuda` (or `--flow-devices 0,1,...`) packing splits the work of a video:

* CPU workers (the `--workers` pool) decode it, JPEG-encode its RGB frames and return its grey
  frames (pack.encode_video with a grey sink instead of a backend);
* flow workers, one process per slot in `PackOptions.flow_devices` (spread over the GPUs),
  take grey videos from their own queue and solve their pairs in batches that span videos
  (`PairBatcher`): a batch is full even at the end of a video, and a pair that never converges
  (a scene cut) holds one batch, not a whole short video's worth. Each finished video's flow is
  quantised and JPEG-encoded on a thread of the flow worker (OpenCV releases the GIL) while the
  GPU runs the next batch, and goes back to the parent keyed by task;
* the parent hands decoded videos to the flow worker with the fewest pairs queued, keeps a
  bounded window of videos in flight (the decoders outrun the GPUs; their grey frames would
  otherwise pile up in memory), and yields results in task order, so shards are written exactly
  as without flow workers: same bytes for the same flow (tests/test_flow_workers.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
from collections import deque
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from preprocess.flow import encode_flow, make_backend
from preprocess.hygiene import children_ignore_ctrl_c, die_with_parent_if_child

WINDOW_PER_WORKER = 4  # videos in flight per CPU or flow worker: enough to keep both busy
FILL_WAIT_S = 0.5  # a flow worker waits this long for more videos before running a part-full batch


class PairBatcher:
    """The pairs of queued videos, handed out `batch` at a time in queue order, and the flow
    gathered back per video. Videos of another frame size wait for a batch of their own."""

    def __init__(self, batch: int):
        self.batch = batch
        self.videos: deque[list] = deque()  # [key, gray [N, H, W], flow [N - 1, H, W, 2], next pair, pairs done]

    @property
    def pending(self) -> int:
        """Pairs queued and not yet handed out."""
        return sum(len(v[1]) - 1 - v[3] for v in self.videos)

    def add(self, key: Any, gray: np.ndarray) -> None:
        n, h, w = gray.shape
        self.videos.append([key, gray, np.zeros((max(n - 1, 0), h, w, 2), np.float32), 0, 0])

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, list[tuple[list, int, int]]]:
        """-> grey frames [N, H, W] (pieces of videos back to back), first [P] (pair i is frames
        first[i], first[i] + 1), and per piece (video entry, first pair, pair count)."""
        pieces, frames, first, taken = [], [], [], 0
        shape = next(v[1].shape[1:] for v in self.videos if v[3] < len(v[1]) - 1)
        for video in self.videos:
            left = len(video[1]) - 1 - video[3]
            if left <= 0 or video[1].shape[1:] != shape:
                continue
            count = min(left, self.batch - taken)
            start = video[3]
            offset = sum(len(f) for f in frames)
            frames.append(video[1][start:start + count + 1])
            first.extend(range(offset, offset + count))
            pieces.append((video, start, count))
            video[3] += count
            taken += count
            if taken == self.batch:
                break
        return np.concatenate(frames), np.asarray(first, dtype=np.int64), pieces

    def put(self, pieces: list[tuple[list, int, int]], flow: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        """Store a batch's flow; -> (key, flow) of every video now complete, in queue order."""
        at = 0
        for video, start, count in pieces:
            video[2][start:start + count] = flow[at:at + count]
            video[4] += count
            at += count
        done = []
        for video in list(self.videos):
            if video[4] == len(video[2]):
                self.videos.remove(video)
                done.append((video[0], video[2]))
        return done


def flow_worker(device: str, flow: str, flow_options: dict, quality: int, inbox, outbox, compiling: int = 0) -> None:
    """One flow worker process: (key, grey) from `inbox` until None -> (key, encoded flow), or
    (None, None, error text) once on `outbox` when it fails. `compiling`: how many flow workers
    compile at once, among which inductor's compile processes share the cores."""
    die_with_parent_if_child()  # a killed run must not leave a process holding GPU memory
    if compiling:  # before the backend's first compile
        from cvtcl.capture import share_compile_threads

        share_compile_threads(compiling)

    def fail(err: Exception) -> None:
        outbox.put((None, None, worker_error(device, err, flow_options)))

    def encode(key: Any, video_flow: np.ndarray) -> None:
        try:
            outbox.put((key, encode_flow(video_flow, quality)))
        except Exception as err:  # reported to the parent, which stops the run with this line
            fail(err)

    try:
        backend = make_backend(flow, **{**flow_options, "device": device})
    except Exception as err:
        return fail(err)
    batcher, closing = PairBatcher(backend.batch), False
    with ThreadPoolExecutor(2) as encoder:
        while not closing or batcher.pending:
            # Fill the batch from what is queued; block only when there is nothing to run.
            while not closing and batcher.pending < backend.batch:
                try:
                    message = inbox.get(timeout=FILL_WAIT_S) if batcher.pending == 0 else inbox.get_nowait()
                except queue.Empty:
                    if batcher.pending or not multiprocessing.parent_process().is_alive():
                        break
                    continue
                if message is None:
                    closing = True
                else:
                    batcher.add(*message)
            if not batcher.pending:
                continue
            frames, first, pieces = batcher.next_batch()
            try:
                result = backend.compute_pairs(frames, first)
            except Exception as err:  # CUDA out of memory, a compile failure: one line to the parent
                return fail(err)
            for key, video_flow in batcher.put(pieces, result):
                encoder.submit(encode, key, video_flow)


class FlowWorkerError(RuntimeError):
    """A flow worker failed (its message names the device and the error); the run stops, keeping
    the shards finished so far (cvtcl-preprocess exits 1, one line)."""


def worker_error(device: str, err: Exception, flow_options: dict) -> str:
    """One line for the parent: the device, the error, and for the GPU's memory what to lower."""
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        batch = flow_options.get("batch")
        size = f"--flow-batch {batch}" if batch else "the default --flow-batch"
        return (f"flow worker on {device} ran out of GPU memory ({size} frame pairs per call): lower --flow-batch "
                "or --flow-workers-per-gpu")
    return f"flow worker on {device}: {type(err).__name__}: {' '.join(str(err).split())}"


def run_with_flow_workers(tasks: list, options, decode: Callable, pool) -> Iterator:
    """Results of `tasks` in order: decode(task) runs on `pool` and returns (EncodedVideo
    without flow, grey [N, H, W]) or a FailedVideo; the flow workers fill in the flow."""
    ctx = multiprocessing.get_context("spawn")
    outbox = ctx.Queue()
    slots = []
    for device in options.flow_devices:
        inbox = ctx.Queue()
        proc = ctx.Process(target=flow_worker, daemon=True, args=(
            device, options.flow, options.flow_options, options.flow_jpeg_quality, inbox, outbox,
            len(options.flow_devices)))  # they all compile at once
        with children_ignore_ctrl_c():
            proc.start()
        slots.append([inbox, proc, 0])  # queue, process, pairs queued
    window = WINDOW_PER_WORKER * (options.workers + len(slots))
    decoding: deque = deque()  # (task index, AsyncResult), in task order
    waiting: dict[int, tuple[Any, int, list]] = {}  # task index -> (encoded video, pairs, slot)
    ready: dict[int, Any] = {}
    submitted = emitted = 0
    try:
        while emitted < len(tasks):
            while submitted < len(tasks) and len(decoding) + len(waiting) + len(ready) < window:
                decoding.append((submitted, pool.submit(decode, tasks[submitted])))
                submitted += 1
            while decoding and decoding[0][1].done():
                index, result = decoding.popleft()
                result = result.result()
                if not isinstance(result, tuple):  # a FailedVideo
                    ready[index] = result
                    continue
                encoded, gray = result
                if len(gray) < 2:  # no pair: no flow frame
                    ready[index] = dataclasses.replace(encoded, flow=[])
                    continue
                slot = min(slots, key=lambda s: s[2])
                slot[0].put((index, gray))
                slot[2] += len(gray) - 1
                waiting[index] = (encoded, len(gray) - 1, slot)
            if emitted in ready:
                yield ready.pop(emitted)
                emitted += 1
                continue
            if not waiting:
                if decoding:
                    futures.wait([decoding[0][1]], timeout=0.05)
                continue
            try:
                index, flow, *error = outbox.get(timeout=0.05)
            except queue.Empty:
                # A worker killed from outside (out of host memory, a driver fault) sends nothing.
                dead = [(device, s[1].exitcode) for device, s in zip(options.flow_devices, slots)
                        if s[2] > 0 and not s[1].is_alive()]
                if dead:
                    raise FlowWorkerError(f"flow worker on {dead[0][0]} exited with status {dead[0][1]} "
                                          "holding videos; see the messages above") from None
                continue
            if error:
                raise FlowWorkerError(error[0])
            encoded, pairs, slot = waiting.pop(index)
            slot[2] -= pairs
            ready[index] = dataclasses.replace(encoded, flow=flow)
    finally:
        for inbox, proc, _ in slots:
            if proc.is_alive():
                inbox.put(None)
        for _, proc, _ in slots:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


# ---- which devices ----------------------------------------------------------------------------

WORKER_OVERHEAD_BYTES = 2 << 30  # CUDA context, inductor's workspace, the allocator's slack
# tvl1-torch per pair at 240x320: working set (state, data, pyramid, chunk temporaries) ~12 MB, and
# the CUDA graphs' static copies of 11 fields for every level and bucket ~17 MB
PAIR_BYTES = 30 << 20
MAX_WORKERS_PER_GPU = 2


def workers_per_gpu(gpu_bytes: int, batch: int, cpu_cores: int, gpus: int) -> int:
    """Flow workers per GPU when --flow-workers-per-gpu is not given: two, so that one worker's
    host side (upload, the convergence read between chunks, download, launching kernels) runs
    while the other's kernels fill the GPU; fewer when the GPU's memory (measured) cannot hold two
    working sets or the cores are short (half of them stay for decoding and JPEG encoding).
    Check it on a GPU box with `python benchmarks/flow_speed.py --gpu-processes 2,3`."""
    by_memory = gpu_bytes // (WORKER_OVERHEAD_BYTES + batch * PAIR_BYTES)
    by_cores = cpu_cores // (2 * gpus)
    return max(1, min(MAX_WORKERS_PER_GPU, by_memory, by_cores))


def describe_flow_workers(flow: str, devices: tuple[str, ...], flow_options: dict) -> str:
    """The line packing prints as its flow workers start: how many on which devices, and, for
    tvl1-torch's fast path on a GPU (the default there), that each worker compiles it before its
    first batch: the first videos take minutes on a new machine (inductor's cache on disk makes
    later runs start in seconds), which is not a stall."""
    counts = {d: devices.count(d) for d in dict.fromkeys(devices)}
    where = ", ".join(f"{d} x{n}" if n > 1 else d for d, n in counts.items())
    line = f"flow: {len(devices)} {flow} worker(s) on {where}"
    if flow == "tvl1-torch" and flow_options.get("path") in (None, "compiled") and any(
            d.startswith("cuda") for d in devices):
        line += ("; each compiles the fast path before its first batch (minutes on a new machine, seconds "
                 "once inductor's cache holds it): the first videos finish late")
    return line


def resolve_flow_devices(flow: str, device: str | None, devices: str | None, per_gpu: int | None,
                         batch: int | None) -> tuple[str, ...]:
    """The flow workers' devices for the CLI: --flow-device cuda -> every visible GPU,
    cuda:i -> that one, --flow-devices 0,2 -> those; each repeated per_gpu times. Empty for the
    CPU (each CPU worker computes its own videos' flow, as before). ValueError says what to do."""
    if devices is None and (device is None or not device.startswith("cuda")):
        if per_gpu is not None:
            raise ValueError("--flow-workers-per-gpu needs --flow-device cuda or --flow-devices")
        return ()
    if flow != "tvl1-torch":
        raise ValueError(f"--flow {flow} runs on the CPU; GPU flow (--flow-device cuda, --flow-devices) "
                         "needs --flow tvl1-torch")
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        raise ValueError(f"{'--flow-devices ' + devices if devices else '--flow-device ' + device}: torch sees "
                         f"no CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         "use --flow-device cpu, or check the NVIDIA driver")
    if devices is not None:
        if device is not None and device != "cuda":
            raise ValueError("give --flow-devices or --flow-device, not both")
        try:
            indices = [int(d) for d in devices.split(",")]
        except ValueError:
            raise ValueError(f"--flow-devices takes GPU indices like 0,1; got {devices!r}") from None
    elif device == "cuda":
        indices = list(range(visible))
    else:
        try:
            indices = [int(device.split(":", 1)[1])]
        except (ValueError, IndexError):  # cuda:x, or cuda0
            raise ValueError(f"--flow-device must be cpu, cuda or cuda:N; got {device!r}") from None
    bad = [i for i in indices if not 0 <= i < visible]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"--flow-devices {indices}: torch sees {visible} GPU(s), 0..{visible - 1}, each once")
    if per_gpu is None:
        per_gpu = min(workers_per_gpu(torch.cuda.get_device_properties(i).total_memory, batch or 64,
                                      os.cpu_count() or 1, len(indices)) for i in indices)
    elif per_gpu < 1:
        raise ValueError(f"--flow-workers-per-gpu must be >= 1, got {per_gpu}")
    return tuple(f"cuda:{i}" for i in indices for _ in range(per_gpu))
