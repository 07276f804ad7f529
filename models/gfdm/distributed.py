"""torchrun support: one process per device, NCCL on GPUs, gloo on CPUs.

``init()`` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without them it
returns a single-process context and nothing in the code path changes. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "init", "pick_device", "device_memory", "check_fits"]


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or another torch device type; got {device!r}") \
            from None
    if d.type == "meta":
        raise ValueError("device 'meta' holds shapes without values: nothing can be trained or sampled on it; use "
                         "auto, cpu or cuda")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        if d.index is None:
            d = torch.device(f"cuda:{local_rank}")
    return d


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has in all: the GPU's for CUDA, physical RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(nbytes: float, device: torch.device, what: str, advice: str) -> None:
    """Refuse, before allocating, work that needs more than all of ``device``'s memory (naming what needs how
    much, the device's total and what to do instead)."""
    total = device_memory(device)
    if nbytes > total:
        raise ValueError(f"{what} needs ~{nbytes / 2 ** 30:.3g} GiB, more than all {total / 2 ** 30:.3g} GiB of "
                         f"{device} memory; {advice}")


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (used for synchronised stops)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_to_main(self, items: list) -> list | None:
        """Concatenate every rank's list of objects on rank 0 (None on other ranks)."""
        if not self.distributed:
            return list(items)
        out: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(items, out, dst=0)
        return [x for part in out for x in part] if out is not None else None


_CONTEXT: Context | None = None


def init(device: str = "auto") -> Context:
    """Initialise the process group once (if launched by torchrun) and return the context."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=pick_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))   # RANK is read by init_process_group (env://)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    _CONTEXT = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)
    return _CONTEXT


def shutdown() -> None:
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None
