"""Process-group setup from torchrun variables, DDP wrapping, gathered evaluation, devices.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touches torch.distributed, so
every helper here is a no-op there. Only rank 0 writes files and logs (:func:`is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capnet.errors import CapnetError, TrainingError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA exists, else CPU; ``cuda`` fails clearly without it."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CapnetError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "auto":
        return torch.device("cpu")
    raise CapnetError(f"train.device={name!r} is not one of auto, cpu, cuda")


def init_distributed(device: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Join the process group described by torchrun's env vars (nccl on CUDA, else gloo).

    ``timeout_s`` (``train.dist_timeout_s``) bounds every collective, barriers included: long
    enough for the slowest rank's share of feature extraction plus rank 0's cache merge.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise CapnetError(f"WORLD_SIZE={world_size} but {var} is not set (launch with torchrun)")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (safe when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first (e.g. filling a disk cache), then on the other ranks."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity alone)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False,
             ignore: Sequence[str] = ()) -> nn.Module:
    """DDP-wrap ``module`` when several processes train it and it has trainable parameters.

    ``ignore`` names parameters DDP must leave alone: the text branch, whose gradient the
    training loop averages itself once per optimiser step (``capnet.train.loop._TextPass``).
    """
    ignored = set(ignore)
    if world_size() == 1 or not any(p.requires_grad for n, p in module.named_parameters() if n not in ignored):
        return module
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-batches."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def gather_predictions(scores: np.ndarray, targets: np.ndarray, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """All-gather per-rank rows, keep each dataset index once (samplers pad), order by index."""
    if world_size() > 1:
        parts: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, (scores, targets, indices))
        scores = np.concatenate([p[0] for p in parts])
        targets = np.concatenate([p[1] for p in parts])
        indices = np.concatenate([p[2] for p in parts])
    order, first = np.unique(indices, return_index=True)
    if world_size() > 1 and len(order) and (order[0] != 0 or order[-1] != len(order) - 1):
        raise TrainingError(
            f"evaluation covered {len(order)} distinct samples with indices {order[0]}..{order[-1]}: "
            "some samples were never predicted (check the evaluation sampler)"
        )
    return scores[first], targets[first]
