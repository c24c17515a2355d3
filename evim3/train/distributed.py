"""Data-parallel training through torchrun: process group set-up, collectives on plain values, and the
command line that reruns a program as N processes on this machine (``torchrun_argv``: the CLI's --nproc
passes its own entry module; see README, "Training on more than one process or machine", for several
machines).

RANK / WORLD_SIZE / LOCAL_RANK come from torchrun's environment; NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from evim3.runtime.errors import BackendUnavailableError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(None, f"device {name!r} asked for, but this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (expected auto, cpu or cuda[:N])")
    return device


def init_distributed(device_name: str) -> DistContext:
    """Join the process group torchrun set up (if any); one process is world size 1 without a group."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world_size, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's `tensor` (same shape on all ranks) along dim 0, on the CPU."""
    if not ctx.distributed:
        return tensor.cpu()
    local = tensor.to(ctx.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def all_gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `value` (picklable plain data), in rank order."""
    if not ctx.distributed:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_from_main(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def torchrun_argv(nproc: int, module: str, args: list[str]) -> list[str]:
    """The command that runs ``python -m module args`` as `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]
