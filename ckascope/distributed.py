"""torchrun support shared by ``ckascope compare`` and the trainers built on ckascope.

Under ``torchrun --nproc_per_node N`` the environment names each process's rank; the process
group uses NCCL when the processes have GPUs and gloo otherwise. A single process needs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ckascope.errors import InputError, LocalInputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, number of processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints summaries."""
        return self.rank == 0


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; other names are checked.

    Raises:
        InputError: CUDA asked for but not available, or an unknown device string.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"unknown device {name!r}. Hint: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} but CUDA is not available here. Hint: use --device cpu")
    if device.type == "cuda" and device.index is not None:
        check_gpu_index(device.index, f"--device {name}")
    return device


def check_gpu_index(index: int, what: str, *, local: bool = False) -> None:
    """Raises InputError unless GPU ``index`` is visible to this process.

    ``local``: the index is this process's own (torchrun's LOCAL_RANK), so other processes
    may not meet the error (a ``LocalInputError``).
    """
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise (LocalInputError if local else InputError)(
            f"{what} asks for GPU {index}, but this process sees {count} GPU(s) "
            f"(cuda:0..cuda:{count - 1}). Hint: choose a visible GPU; CUDA_VISIBLE_DEVICES and "
            "--nproc_per_node must leave one per process"
        )


def init_distributed(device: str | None = "auto") -> DistInfo:
    """Joins the torchrun process group when started by torchrun; otherwise a single process.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N"; under torchrun with CUDA each process takes
            the GPU of its local rank.
    """
    global _OWNED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world == 1:
        if base.type == "cuda" and base.index is not None:
            torch.cuda.set_device(base)  # kernels and allocations go where the model is
        return DistInfo(0, 1, base)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        check_gpu_index(local_rank, f"torchrun's LOCAL_RANK {local_rank}", local=True)
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
        _OWNED = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), base)


#: Whether this module started the process group (and so may end it).
_OWNED = False


def close_distributed() -> None:
    """Ends the process group ``init_distributed`` started; a caller's own group is left alone."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum of a number over all processes (the number itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
