"""CUDA graph capture, and a stand-in for it that runs on the CPU.

`cuda_capture(body)` records body() in a CUDA graph and returns (replay, outputs): each replay
reruns the recorded kernels on the same memory, and `outputs()` are the tensors body() returned,
refreshed by every replay. Python does not run at replay: every host-side value body() used (a
Python float, a count kept on the host, a branch taken) is what it was at capture.

`recorded_capture(body)` keeps those semantics without a GPU, for tests: capture records body()'s
aten ops (a dispatch mode) and then undoes everything they wrote (a capture computes nothing), a
host read inside it raises as it does in a capture, and a replay runs the recorded ops alone,
without the Python around them. As a CUDA graph, the recording does not keep alive the tensors
made outside the capture that it reads or writes: a replay after the last of one is gone raises
(on a GPU it would read memory the allocator has given to something else). Code that is correct
under it reads nothing on the host that changes between replays, and keeps what its graphs use. Used by cvtcl/graphed.py (the training step) and
preprocess/flow_kernels.py (TV-L1 chunks); limits: ops that bypass aten dispatch (inductor's CPU
kernels) are not recorded, so the compiled paths are checked with their compiler off.

`inductor_unsupported(device)` says whether torch.compile, which both compiled paths put inside
their graphs, can make kernels for a GPU at all; `share_compile_threads(processes)` gives each of
several processes that compile at once its share of the cores for inductor's compile processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
Body = Callable[[], Any]
Capture = Callable[[Body], tuple[Callable[[], None], Callable[[], Any]]]
INDUCTOR_MIN_CAPABILITY = (7, 0)  # torch.compile's GPU kernels are Triton's, which runs on Volta and newer


def inductor_unsupported(device: torch.device) -> str | None:
    """The GPU's compute capability ("6.1") when torch.compile cannot make kernels for it; None
    when it can, and off CUDA."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    return None if capability >= INDUCTOR_MIN_CAPABILITY else ".".join(map(str, capability))


def compile_threads(processes: int, cpus: int | None = None) -> int:
    """inductor's compile processes for each of `processes` that compile at once: the machine's
    cores shared among them (inductor's own default, min(32, cores), in every process: 16 flow
    workers or 8 trainer processes on one box would start hundreds beside the data workers)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(32, cpus // max(processes, 1)))


def share_compile_threads(processes: int) -> None:
    """Set this process's share (compile_threads) unless the user set TORCHINDUCTOR_COMPILE_THREADS:
    in the environment, which inductor reads when its config is imported, and in that config when
    it already is (it is read again when the first compile starts its pool)."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    threads = compile_threads(processes)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        config.compile_threads = threads


def cuda_capture(body: Body, pool=None):
    """Capture body() in a CUDA graph: (replay, the static outputs the replays refresh). `pool`:
    a memory pool shared with other graphs that are never replayed at the same time."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        # thread_local: other threads (DALI's, a JPEG encoder's) may keep using CUDA while this one captures
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = body()
    finally:
        # torch.cuda.graph leaves its capture stream current when ending the capture raises (an op
        # the capture could not hold): the eager fallback would run on that side stream, unordered
        # with the default stream's copies of the next batch
        torch.cuda.set_stream(stream)
    return graph.replay, lambda: outputs


def new_pool(capture: Capture):
    """A memory pool for graphs of `capture` that replay in the order they were captured (a
    forward and then its backward): each reads what the one before it wrote there."""
    return torch.cuda.graph_pool_handle() if capture is cuda_capture else _Pool()  # else: the stand-in's


@dataclass
class _Pool:
    """The stand-in's memory pool: what its graphs' last replays made (by the id of the tensor made
    at capture each stands for) and the storages its captures made, which it keeps as a CUDA
    graph's pool keeps its memory."""

    live: dict[int, torch.Tensor] = field(default_factory=dict)
    made: set[int] = field(default_factory=set)


def recorded_capture(body: Body, pool: _Pool | None = None):
    """CPU stand-in for tests, with a CUDA graph's semantics (module docstring): (replay, outputs).
    `pool` (from `new_pool`): a backward captured after its forward reads the tensors the forward's
    last replay made, as a CUDA graph reads the memory its pool shares with the forward's graph."""
    recorder = _Recorder(set() if pool is None else pool.made)
    try:
        with recorder:
            outputs = body()
    finally:
        recorder.undo_writes()  # a capture, finished or failed, has computed nothing
    live: dict[int, torch.Tensor] = {} if pool is None else pool.live
    if pool is not None:
        pool.made |= recorder.created

    def replay() -> None:
        if pool is None:
            live.clear()

        def current(x):
            return live.get(id(x), x) if isinstance(x, torch.Tensor) else x

        with torch.no_grad():
            for func, args, kwargs, out in recorder.ops:
                new = func(*tree_map(current, tree_map(_Outside.resolve, args)),
                           **tree_map(current, tree_map(_Outside.resolve, kwargs)))
                for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                    if isinstance(old, torch.Tensor):
                        live[id(old)] = fresh

    return replay, lambda: tree_map(lambda x: live.get(id(x), x) if isinstance(x, torch.Tensor) else x, outputs)


class _Recorder(TorchDispatchMode):
    """Records each aten op with its arguments and results (those the capture made kept alive, so
    ids stay unique; those made outside held as a CUDA graph holds them, as `_Outside`); saves
    every storage the capture did not create before an op first touches it, for `undo_writes`
    (not only the arguments a schema marks as written: native_batch_norm updates its running
    statistics in place unmarked); refuses host reads."""

    def __init__(self, pooled: set[int]):
        super().__init__()
        self.ops: list[tuple] = []
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.created: set[int] = set()
        self.pooled = pooled  # storages that earlier captures into the same pool made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default or func.overloadpacket.__name__ == "nonzero":
            raise RuntimeError(f"{func.overloadpacket.__name__} reads a device value on the host: "
                               "not permitted while a CUDA graph is captured")
        for tensor in tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and _storage(tensor) not in self.created:
                self._save(tensor)
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and _storage(tensor) not in self.saved:
                self.created.add(_storage(tensor))
        self.ops.append((func, *tree_map(self._weakly, (args, kwargs, out))))
        return out

    def _weakly(self, x):
        """A tensor made outside the capture as an `_Outside` (the recording does not keep it alive);
        the rest as it is."""
        if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes() \
                and _storage(x) not in self.created and _storage(x) not in self.pooled:
            return _Outside(x)
        return x

    def _save(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.saved:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            self.saved[storage._cdata] = (whole, whole.clone())

    def undo_writes(self) -> None:
        for whole, before in self.saved.values():
            whole.copy_(before)
        self.saved.clear()  # the storages made outside are the caller's to keep


def _storage(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (its address as an object: data pointers are all 0 on the
    meta device and for empty tensors)."""
    return tensor.untyped_storage()._cdata


class _Outside:
    """A tensor made outside a recorded capture, held as a CUDA graph holds it: by its memory's
    address only (a weak reference to its storage), with its view's offset, size and strides."""

    def __init__(self, tensor: torch.Tensor):
        self.storage = StorageWeakRef(tensor.untyped_storage())
        self.view = (tensor.storage_offset(), tensor.size(), tensor.stride())
        self.dtype, self.device, self.what = tensor.dtype, tensor.device, f"{tuple(tensor.shape)} {tensor.dtype}"

    @staticmethod
    def resolve(x):
        """The tensor again, on its storage if something outside still keeps that alive."""
        if not isinstance(x, _Outside):
            return x
        storage = torch.UntypedStorage._new_with_weak_ptr(x.storage.cdata)
        if storage is None:
            raise RuntimeError(f"a replay reads a tensor made outside its capture ({x.what}) that has been freed "
                               "since: a CUDA graph would read memory given to something else; keep it alive, "
                               "or write each step's values into one persistent tensor")
        return torch.empty(0, dtype=x.dtype, device=x.device).set_(storage, *x.view)
