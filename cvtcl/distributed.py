"""Process group setup for torchrun (env://) and collectives that also work in one process.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and the rendezvous variables for several nodes);
`python -m cvtcl.train` sets none of them and runs as world size 1 without a process group,
so CPU tests run the same code as an 8-GPU job. Backends: nccl when training on CUDA, gloo on CPU.
LOCAL_RANK picks the GPU and the DALI `device_id`; RANK and WORLD_SIZE shard the data.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_id(self) -> int | None:
        """DALI's device_id: the local GPU, or None for DALI's CPU-only mode."""
        return self.device.index if self.device.type == "cuda" else None


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without torchrun."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if "WORLD_SIZE" not in os.environ and tasks.isdigit() and int(tasks) > 1:  # `srun -n N python -m cvtcl...`
        raise ValueError(f"SLURM started {tasks} tasks of this command (SLURM_STEP_NUM_TASKS), not torchrun: each "
                         "would run alone, on one run.out_dir. Start torchrun as one task per node (srun "
                         "--ntasks-per-node=1 torchrun --nnodes $SLURM_NNODES --nproc_per_node GPUS --rdzv-backend "
                         "c10d --rdzv-endpoint FIRST_NODE:29400 -m cvtcl.train ...), or one task")
    try:
        rank, local_rank, world = (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                                   int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        raise ValueError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({err}); launch with torchrun") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local_rank}: the world needs at least one "
                         "process and ranks 0..WORLD_SIZE-1; launch with torchrun")
    return rank, local_rank, world


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but torch sees no CUDA device; use run.device=cpu (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "--nproc_per_node must not exceed the GPUs per node"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device_name: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun process group (if any) and pick this process's device."""
    rank, local_rank, world_size = env_world()
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            # Binding the group to the device lets NCCL connect eagerly (faster first collective).
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world_size, device)


_host_group = None  # gloo over the same ranks, for small agreements between hosts (gather_objects)


def shutdown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def host_group():
    """A gloo group over every rank: a host-side agreement through it does not wait for the GPU,
    as one through nccl (a device tensor read back) would. Made at first use, by every rank."""
    global _host_group
    if _host_group is None:
        _host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _host_group


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; CPU tensors)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on each rank -> [world * N, ...], rank order, no gradient. Identity at world size 1.

    Every rank must pass the same shape (the loader drops the last partial batch on every rank).
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Send rows [sum(send_counts), ...] in rank order, send_counts[r] to rank r; receive
    recv_counts[r] rows from rank r, concatenated in rank order. No gradient."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return out


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of Python floats over ranks (one collective); returned unchanged at world size 1."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (e.g. a SIGTERM that reached one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
