"""torchrun / DDP plumbing shared by extraction and fine-tuning; devices; sharding.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; outside it we are a
single process and every helper here degrades to a no-op.

Every collective of the project goes through the helpers below (:func:`all_reduce_`,
:func:`all_reduce_sum`, :func:`all_reduce_grads`, :func:`all_reduce_mean_`, :func:`gather_objects`,
:func:`barrier`):
they put the tensor on a device the process group's backend serves. NCCL serves only CUDA
tensors ("No backend type associated with device type cpu" for a CPU tensor), so on GPUs the
default group is created as ``cpu:gloo,cuda:nccl``; a group made by someone else without a CPU
backend gets a gloo side group for CPU-side collectives.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from .utils import ClamMcmkdError, CudaProbe, check_device

T = TypeVar("T")
log = logging.getLogger(__name__)

# A rank that finishes its slides early waits in a barrier for the slowest one; NCCL's default
# (10 minutes) kills it long before a cohort of uneven slides is done.
DEFAULT_TIMEOUT_S = 2 * 3600.0
GPU_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """The ranks torchrun announced (a single process when it did not)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


# ----------------------------------------------------------------------------- devices


def rank_device(device: str, info: DistInfo, probe: CudaProbe | None = None) -> str:
    """Under torchrun each rank takes its LOCAL_RANK's GPU, whatever index --device named."""
    if not (info.enabled and str(device).startswith("cuda")):
        return device
    wanted = f"cuda:{info.local_rank}"
    if device not in ("cuda", wanted) and info.local_rank == 0:
        log.warning("--device %s under torchrun: each rank uses cuda:LOCAL_RANK", device)
    return check_device(wanted, probe)


# ----------------------------------------------------------------------------- process group


def parse_timeout(text: str | float | int) -> float:
    """Seconds from '7200', '90m', '2h', '1d' (a --dist-timeout value)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ClamMcmkdError(f"--dist-timeout {text!r}: expected seconds or e.g. 90m, 2h, 1d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def process_group_backend(device: str) -> str:
    """gloo on CPU; on CUDA NCCL for CUDA tensors *and* gloo for CPU ones (objects, sums)."""
    return GPU_BACKEND if str(device).startswith("cuda") else "gloo"


def init_kwargs(
    device: str, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> dict:
    """Arguments for ``init_process_group``: backend, timeout and (CUDA) the rank's device_id."""
    import torch
    import torch.distributed as dist

    kwargs = {
        "backend": backend or process_group_backend(device),
        "timeout": timedelta(seconds=float(timeout_s)),
    }
    supported = inspect.signature(dist.init_process_group).parameters
    if str(device).startswith("cuda") and "device_id" in supported:
        kwargs["device_id"] = torch.device(device)  # binds NCCL to this rank's GPU, not GPU 0
    return kwargs


_CPU_GROUP: dict[str, object] = {}  # the gloo side group, when the default group lacks cpu


def init_distributed(
    device: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> DistInfo:
    """Join the torchrun process group if launched by torchrun.

    `device` is the rank's device (see :func:`rank_device`); `backend` overrides the choice of
    :func:`process_group_backend`.
    """
    info = dist_info_from_env()
    if not info.enabled:
        return info
    import torch
    import torch.distributed as dist

    device = rank_device(device, info)
    if not dist.is_initialized():
        if str(device).startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(**init_kwargs(device, timeout_s, backend))
    _CPU_GROUP.clear()
    if not _serves(None, "cpu"):
        _CPU_GROUP["group"] = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=float(timeout_s))
        )
    return info


@contextlib.contextmanager
def distributed_run(
    device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[tuple[str, DistInfo]]:
    """The block runs in torchrun's process group (if launched by torchrun), and leaves it:
    yields (this rank's device, DistInfo)."""
    info = init_distributed(device, timeout_s=timeout_s)
    if not info.enabled and str(device).startswith("cuda:"):
        import torch

        # the current device, before any loader's pin-memory thread opens a context (on GPU 0
        # otherwise); under torchrun init_distributed binds each rank's own
        torch.cuda.set_device(torch.device(device))
    try:
        yield rank_device(device, info), info
    finally:
        cleanup(info)


def _serves(group, device_type: str) -> bool:
    import torch.distributed as dist

    group = group or dist.group.WORLD
    types = {d.type for d in group._device_types}
    return not types or device_type in types  # no backend registered yet: torch picks lazily


def _placement(device):
    """(group, device) for a collective on a tensor living on `device`."""
    import torch

    device = torch.device(device)
    if _serves(None, device.type):
        return None, device
    if _serves(None, "cpu"):
        return None, torch.device("cpu")
    return _CPU_GROUP.get("group"), torch.device("cpu")


def all_reduce_(tensor, info: DistInfo):
    """Sum `tensor` over ranks in place (moved to a served device and back if need be)."""
    if not info.enabled:
        return tensor
    import torch.distributed as dist

    group, device = _placement(tensor.device)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Per-position sums over ranks of a few Python numbers (float64, exact for counts)."""
    if not info.enabled:
        return [float(v) for v in values]
    import torch

    return all_reduce_(torch.tensor(list(values), dtype=torch.float64), info).tolist()


def all_reduce_grads(params: Sequence, info: DistInfo) -> None:
    """Sum every parameter's gradient over ranks, one flat buffer per (device, dtype).

    A parameter without a gradient on this rank contributes zeros, so every rank enters the
    same collectives whatever its batch did.
    """
    if not info.enabled:
        return
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_flat_([p.grad for p in params], info)


def all_reduce_mean_(tensors: Sequence, info: DistInfo) -> None:
    """Average tensors over ranks in place (e.g. BatchNorm running statistics)."""
    if info.enabled:
        for t in all_reduce_flat_(tensors, info):
            t.div_(info.world_size)


def all_reduce_flat_(tensors: Sequence, info: DistInfo) -> list:
    """Sum tensors over ranks in place, one flat buffer per (device, dtype); returns them."""
    if not info.enabled:
        return list(tensors)
    import torch

    buckets: dict[tuple, list] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for _, group in sorted(buckets.items(), key=lambda kv: str(kv[0])):
        flat = all_reduce_(torch.cat([t.reshape(-1) for t in group]), info)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return list(tensors)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order, through a CPU-serving group."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    group, _ = _placement("cpu")
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def from_main(make, info: DistInfo):
    """`make()` run by rank 0 alone, its (picklable) result handed to every rank: one decision
    where ranks could see different files (node-local disks) or the same files at different
    moments (another rank already writing)."""
    import torch.distributed as dist

    if not (info.enabled and dist.is_initialized()):  # no group: nobody to hand it to
        return make()
    group, _ = _placement("cpu")
    box = [make() if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        group, _ = _placement("cpu")
        dist.barrier(group=group)


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        _CPU_GROUP.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- sharding


def pack_by_size(sizes: Sequence[float], bins: int) -> list[list[int]]:
    """Greedy largest-first bin packing of item indices into `bins` (LPT scheduling).

    Deterministic (ties broken by index, then by bin), so every rank computes the same answer;
    equal sizes give round-robin. Each bin lists its indices in ascending order.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    order = sorted(range(len(sizes)), key=lambda i: (-float(sizes[i]), i))
    loads = [0.0] * bins
    packed: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        b = min(range(bins), key=lambda k: (loads[k], k))
        loads[b] += float(sizes[i])
        packed[b].append(i)
    return [sorted(p) for p in packed]


def shard_of(
    items: Sequence[T], index: int, count: int, sizes: Sequence[float] | None = None
) -> list[T]:
    """Part `index` of `count` of `items`, balanced by `sizes` (e.g. patches per slide)."""
    if not 0 <= index < count:
        raise ClamMcmkdError(f"shard {index}/{count}: need 0 <= I < N")
    if sizes is not None and len(sizes) != len(items):
        raise ValueError(f"{len(sizes)} sizes for {len(items)} items")
    weights = [1.0] * len(items) if sizes is None else sizes
    return [items[i] for i in pack_by_size(weights, count)[index]]


def shard(items: Sequence[T], info: DistInfo, sizes: Sequence[float] | None = None) -> list[T]:
    """This rank's share of `items` (deterministic, disjoint, covering), balanced by `sizes`."""
    return shard_of(items, info.rank, info.world_size, sizes)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0-based I, as SLURM_ARRAY_TASK_ID with --array=0-(N-1)) -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ClamMcmkdError(f"--shard {text!r}: expected I/N, e.g. 0/8")
    index, count = int(match.group(1)), int(match.group(2))
    if not 0 <= index < count:
        raise ClamMcmkdError(f"--shard {text}: need 0 <= I < N")
    return index, count


def shard_file_name(name: str, shard_text: str | None) -> str:
    """A run file's name for array job ``I/N`` (``summary.json`` -> ``summary.shard-I-of-N.json``),
    so the jobs of one array do not overwrite each other's; unchanged without a shard."""
    if not shard_text:
        return name
    index, count = parse_shard(shard_text)
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.shard-{index}-of-{count}{dot}{ext}"


def coords_patch_counts(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Rows of each coords h5 (0 for a file that cannot be read: it fails later, in its slot)."""
    import h5py

    counts = []
    for path in paths:
        try:
            with h5py.File(Path(path), "r") as f:
                counts.append(int(f["coords"].shape[0]))
        except (OSError, KeyError):
            counts.append(0)
    return counts
