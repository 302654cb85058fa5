"""What the machine offers: native bf16, CPU cores, and a thread / decode-worker budget.

bf16 autocast is ~2.8x faster than float32 for the frozen towers on CPUs with AVX512-BF16 or
AMX (measured in benchmarks/speed.py) and *slower* on CPUs that emulate it, so ``auto`` uses it
only where the hardware has it. The budget splits the cores between JPEG-decoding DataLoader
workers and torch's intra-op threads so the two never oversubscribe the machine (2 workers
beside 2 torch threads on 2 cores spent a quarter of the demo's CPU time in the kernel).

glibc returns every freed block above its mmap threshold to the kernel, so each conv activation
of a batched forward is a fresh ``mmap`` whose pages fault in again: EfficientNet-Lite0 at 224 px
took ~5,000 page faults and 11 ms per image, 5 ms once freed memory stays in the heap
(``keep_freed_memory``; the reason PyTorch's CPU tuning guide suggests jemalloc / tcmalloc).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from dataclasses import dataclass
from typing import Optional

import torch


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
KEEP_TRIM_THRESHOLD = 1 << 30  # give memory back to the system only above 1 GiB of free heap top

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, else the count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Processes sharing this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank_cores() -> int:
    """This process's share of the cores: torchrun gives every local rank the whole affinity mask,
    so N ranks each planning for all cores would run N times too many threads and workers."""
    return max(1, usable_cores() // local_world_size())


@dataclass(frozen=True)
class Budget:
    """How many decode workers and torch threads to use."""

    workers: int  # DataLoader worker processes for JPEG decoding
    threads: int  # torch intra-op threads in the main process


def budget(cores: Optional[int] = None, workers: Optional[int] = None, threads: Optional[int] = None) -> Budget:
    """Split ``cores`` between decode workers and torch threads (explicit values win).

    Decoding a bundled (<=500 px) JPEG and resizing it costs ~1 ms, a fifth of a bf16
    EfficientNet-Lite0 forward on 2 threads, so below 4 cores decoding runs in the main process
    (a worker process costs its start-up and steals a core: 7.1 vs 6.7 ms/img end to end on 768
    images, 2 cores); from 4 cores one worker per four cores keeps the tower fed and the rest are
    torch threads (benchmarks/speed.py measures the alternatives on the machine at hand).
    Under torchrun the cores are this local rank's share (:func:`rank_cores`).
    """
    cores = rank_cores() if cores is None else cores
    if workers is None:
        workers = cores // 4
    if threads is None:
        threads = max(1, cores - workers)
    return Budget(workers=int(workers), threads=int(threads))


def apply_budget(workers: Optional[int] = None, threads: Optional[int] = None,
                 keep_freed: bool = False) -> Budget:
    """Resolve the decode workers / torch threads (``data.num_workers`` / ``train.threads``; None:
    the machine's budget) and apply them to this process, with glibc's allocator setting.

    An explicit ``threads`` is applied as given; the automatic budget only ever lowers torch's
    count (a process that already chose fewer threads, e.g. through OMP_NUM_THREADS or a test
    harness, keeps its choice). The CLI calls this once per process (``capnet.plans.tune_process``).
    """
    plan = resolve_budget(workers, threads)
    if keep_freed:
        keep_freed_memory()
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    return plan


def resolve_budget(workers: Optional[int] = None, threads: Optional[int] = None) -> Budget:
    """What :func:`apply_budget` would apply, without applying anything (explicit values win;
    the automatic thread count never exceeds the process's current one)."""
    plan = budget(workers=workers, threads=threads)
    chosen = plan.threads if threads is not None else min(plan.threads, torch.get_num_threads())
    return Budget(workers=plan.workers, threads=chosen)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap (no per-tensor mmap / munmap); True if applied.

    It acts on memory freed afterwards, so compare it in fresh processes (benchmarks/allocator.py).
    Only glibc on Linux has ``mallopt``; elsewhere this is a no-op (False). The cost is memory: freed
    blocks are not given back until exit (the demo's peak RSS went from 2.4 to 3.3 GB).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    if not ok:
        log.warning("glibc mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD: CPU forwards keep the default allocator")
    return bool(ok)
