"""Host synchronisations and kernel-launching ops of a training step, counted on the meta device.

On the meta device every aten op dispatches as it would on a GPU (same shapes, same dtypes, the
same sequence of kernels) but nothing is computed, so S3D at paper shapes costs milliseconds and
no GPU is needed. `audit()` runs a callable under a dispatch mode and counts

- syncs: what makes the host wait for the device: `_local_scalar_dense` (`.item()`, `int(t)`,
  `bool(t)`), `nonzero` (a data-dependent shape), `Tensor.tolist`, a blocking copy between a CPU
  tensor and a device tensor (either direction), and `torch.cuda.synchronize`;
- launches: ops that run a kernel, i.e. every dispatched op except views, metadata and
  allocation (`empty`, `detach`, `view`, `transpose`, ...);
- flops: the floating-point operations of its convolutions and matrix products, forward and
  backward (`torch.utils.flop_counter`, two per multiply-add): the arithmetic the GPU must do,
  whatever the dtype, which turns a measured samples/s into TFLOP/s;
- bytes: what the launching ops read and write (every tensor argument read once, every output
  written once, as an unfused eager op moves them): the memory traffic of the step as eager runs
  it in its dtype, against which a GPU's bandwidth gives the step's memory floor.

A host read on the meta device has no value: `_local_scalar_dense` answers 0, `tolist` zeros,
`nonzero` an empty index. The counts are what matters. Used by tests/test_step_audit.py (0 syncs
on ordinary steps, the step's FLOPs and bytes) and benchmarks/train_speed.py (all of them per step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# Dispatched but launch nothing on a GPU: allocation, metadata, aliasing.
NO_LAUNCH = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_local_scalar_dense", "set_", "resize_", "_unsafe_view", "view", "_reshape_alias", "is_pinned", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "record_stream", "_has_compatible_shallow_copy_type",
}


@dataclass
class Audit:
    """What one audited call did: host syncs and launches by op name, FLOPs and bytes (graph
    replays excluded: a replay's ops run uncounted)."""

    syncs: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)
    flops: int = 0
    bytes: int = 0

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    @property
    def launch_count(self) -> int:
        return sum(self.launches.values())


def _is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


class _Counting(TorchDispatchMode):
    def __init__(self, audit: Audit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten._local_scalar_dense.default:
            if args[0].device.type == "cpu":  # a host tensor: no device to wait for
                return func(*args, **kwargs)
            self.audit.syncs["item"] += 1
            if args[0].device.type == "meta":
                return False if args[0].dtype == torch.bool else 0
        elif name == "nonzero":
            self.audit.syncs["nonzero"] += 1
            if args[0].device.type == "meta":
                return torch.empty((0, args[0].dim()), dtype=torch.long, device="meta")
        elif name in ("_to_copy", "copy_") and self._blocking_cross_device(name, args, kwargs):
            self.audit.syncs[f"blocking {name}"] += 1
        if func.is_view or name in NO_LAUNCH:
            return func(*args, **kwargs)
        self.audit.launches[name] += 1
        result = func(*args, **kwargs)
        # every input read once and every output written once (an in-place op's output is its input, rewritten)
        self.audit.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor))
        return result

    @staticmethod
    def _blocking_cross_device(name: str, args: tuple, kwargs: dict) -> bool:
        if kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2]):
            return False
        if name == "_to_copy":
            source, target = args[0], kwargs.get("device") or args[0].device
            return isinstance(source, torch.Tensor) and (source.device.type == "cpu") != (torch.device(target).type == "cpu")
        destination, source = args[0], args[1]
        return isinstance(source, torch.Tensor) and _is_host(destination) != _is_host(source)


@contextmanager
def _patched_host_reads(audit: Audit) -> Iterator[None]:
    """tolist and torch.cuda.synchronize do not go through aten dispatch: count them here."""
    tolist, synchronize = torch.Tensor.tolist, torch.cuda.synchronize

    def counting_tolist(self):
        if self.device.type != "cpu":
            audit.syncs["tolist"] += 1
        if self.device.type == "meta":
            return torch.zeros(self.shape, dtype=self.dtype).tolist()
        return tolist(self)

    def counting_synchronize(device=None):
        audit.syncs["cuda.synchronize"] += 1

    torch.Tensor.tolist, torch.cuda.synchronize = counting_tolist, counting_synchronize
    try:
        yield
    finally:
        torch.Tensor.tolist, torch.cuda.synchronize = tolist, synchronize


_auditing: list[Audit] = []  # the audit() running now, innermost last


def audit(fn: Callable[[], Any]) -> tuple[Any, Audit]:
    """Run fn() and return (its result, what it synced, launched and computed)."""
    record = Audit()
    _auditing.append(record)
    flops = FlopCounterMode(display=False)
    try:
        with fused_on_meta(), _patched_host_reads(record), flops, _Counting(record):
            result = fn()
    finally:
        _auditing.pop()
    record.flops = flops.get_total_flops()
    return result, record


def replay_counting_capture(body: Callable[[], Any], pool=None):
    """`cvtcl.capture.recorded_capture` whose every replay counts as one launch ("graph replay")
    in the running audit, its recorded ops uncounted: what a step of CUDA graphs launches from
    the host (cvtcl/graphed.py's per-call graphs on the meta device)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from cvtcl.capture import recorded_capture

    replay, outputs = recorded_capture(body, pool)

    def counted() -> None:
        if _auditing:
            _auditing[-1].launches["graph replay"] += 1
        with _disable_current_modes():
            replay()

    return counted, outputs


@contextmanager
def fused_on_meta() -> Iterator[None]:
    """Let torch.optim build fused optimizers for meta parameters (the CUDA path: fused Adam with
    its device-side skip), and torch.nn.utils' gradient norms use the foreach kernels (as on
    CUDA: a few launches, not one per parameter); torch lists meta as unsupported for both only
    because it computes nothing."""
    from torch.optim import optimizer
    from torch.utils import _foreach_utils

    supported = optimizer._get_fused_kernels_supported_devices
    foreach = _foreach_utils._get_foreach_kernels_supported_devices
    optimizer._get_fused_kernels_supported_devices = lambda: [*supported(), "meta"]
    _foreach_utils._get_foreach_kernels_supported_devices = lambda: [*foreach(), "meta"]
    try:
        yield
    finally:
        optimizer._get_fused_kernels_supported_devices = supported
        _foreach_utils._get_foreach_kernels_supported_devices = foreach


def meta_context(config):
    """The training context of `config` on the meta device, as the audits run it: fused Adam as
    on a GPU, and stage 2's sampler a random encoder of its modality (a checkpoint's weights cannot
    load onto meta, and the counts do not depend on them)."""
    from unittest import mock

    from cvtcl import train
    from cvtcl.cotrain import FrozenSampler
    from cvtcl.distributed import DistInfo
    from cvtcl.models import Encoder

    def random_sampler(config, device):
        return FrozenSampler(Encoder(config.stage.sampler_modality, config.model.backbone).to(device))

    with fused_on_meta(), mock.patch.object(train, "load_sampler", random_sampler):
        return train.build_context(config, DistInfo(0, 0, 1, torch.device("meta")))
