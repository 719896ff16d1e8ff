"""Where a training process runs: device choice and, under ``torchrun`` (``WORLD_SIZE`` > 1), the
process group of DistributedDataParallel (NCCL on GPUs, gloo on CPU) and the reductions the training
loop and evaluation need (metrics are summed over processes; only rank 0 writes files)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "setup_distributed", "check_device", "broadcast_buffers"]


@dataclass
class DistributedContext:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: List[float]) -> List[float]:
        """Sum ``values`` over processes (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def all_true(self, flag: bool) -> bool:
        return self.sum([0.0 if flag else 1.0])[0] == 0.0

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def check_device(device: str) -> None:
    """ValueError (one line) unless ``device`` is ``auto``, ``cpu`` or a ``cuda``/``cuda:N`` this torch can use."""
    if device in ("auto", "cpu"):
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type != "cuda":
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "sees no CUDA GPU" if torch.backends.cuda.is_built() else "was built without CUDA"
        raise ValueError(f"device {device!r} cannot be used: this torch ({torch.__version__}) {why}; use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device
    (ValueError, one line, for one this torch cannot use: :func:`check_device`)."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        index = local_rank if world_size > 1 else (torch.device(device).index or 0 if device != "auto" else 0)
        torch.cuda.set_device(index)
        chosen = torch.device("cuda", index)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, chosen)


def broadcast_buffers(model: nn.Module, context: DistributedContext) -> None:
    """Give every process rank 0's batch-norm statistics (they drift apart during an epoch)."""
    if context.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)
