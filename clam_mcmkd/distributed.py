"""torchrun / DDP plumbing shared by extraction and fine-tuning.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; outside it we are a
single process and every helper here degrades to a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


@contextlib.contextmanager
def distributed_run(device: str) -> Iterator[tuple[str, DistInfo]]:
    """The block runs in torchrun's process group (if launched by torchrun), and leaves it:
    yields (this rank's device, DistInfo)."""
    info = init_distributed(device)
    try:
        yield rank_device(device, info), info
    finally:
        cleanup(info)


def rank_device(device: str, info: DistInfo) -> str:
    """With several ranks on CUDA, each rank takes its LOCAL_RANK's GPU."""
    if info.enabled and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """Round-robin share of `items` for this rank (deterministic, disjoint, covering)."""
    return list(items[info.rank :: info.world_size])


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def gather_objects(obj: T, info: DistInfo) -> list[T]:
    """Every rank's `obj` in rank order, on every rank (``[obj]`` outside torchrun)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_sum(values: list[float], info: DistInfo, device: str = "cpu") -> list[float]:
    """Element-wise sum over ranks (float64), as plain floats."""
    if not info.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: list, info: DistInfo) -> None:
    """Sum every parameter's gradient over ranks with one flat all-reduce (missing grads: 0)."""
    if not info.enabled:
        return
    import torch
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
