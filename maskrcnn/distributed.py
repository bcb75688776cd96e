"""Multi-process training helpers over ``torch.distributed``.

A run started by ``torchrun --nproc_per_node=N`` has the environment variables ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR`` / ``MASTER_PORT``); :func:`init_distributed`
reads them and joins the process group. Without them (a plain ``python`` run) every helper here
behaves as the single process of a world of size 1.
"""

from __future__ import annotations

import os
from typing import Dict, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def init_distributed(device_type: str) -> bool:
    """Join the process group described by the torchrun environment variables, if there is one.

    device_type: "cuda" (NCCL backend; each process uses GPU ``LOCAL_RANK``) or "cpu" (gloo).
    Returns True when this call created the process group (the caller then owns :func:`cleanup`),
    False for a single-process run or a group that already exists.
    Raises ``ValueError`` when ``WORLD_SIZE`` > 1 but ``RANK`` or ``LOCAL_RANK`` is missing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return False
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun")
    if device_type == "cuda":
        torch.cuda.set_device(get_local_rank())
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", get_local_rank()))
    else:
        dist.init_process_group(backend="gloo")
    return True


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank of this process on its machine, which picks its GPU (``LOCAL_RANK``, 0 if unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the process that writes checkpoints, logs and figures."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """The device the backend's collectives take tensors on: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Dict[str, Union[float, Tensor]]) -> Dict[str, float]:
    """Mean over processes of each named scalar, as Python floats (for logging).

    values: name -> Python number or 0-dim tensor (any device); every process must pass the same names
    in the same order. One collective for the whole dict; without a process group, just the floats.
    """
    names = list(values)
    if not names:
        return {}
    if get_world_size() > 1:
        device = _collective_device()
    else:
        device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(values[k], device=device).detach().reshape(()).double() for k in names])
    if get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / get_world_size()
    return dict(zip(names, stacked.tolist()))


def all_true(flag: Tensor) -> bool:
    """Whether a 0-dim bool tensor is True on every process (one host sync; one collective under DDP)."""
    if get_world_size() > 1:
        flag = flag.to(_collective_device(), torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_gather_object(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
