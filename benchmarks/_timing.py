"""Timing helpers for the capnet benchmarks: interleaved paired repeats, medians, machine facts.

Method: every candidate gets ``warmup`` untimed calls first (allocator, caches, lazy init,
torch.compile). Then, for each of ``repeats`` rounds, every candidate runs once, in an order
rotated from round to round, each call bracketed by ``torch.cuda.synchronize`` (when on CUDA)
and ``time.perf_counter``. Interleaving means a slow spell of a shared machine hits all
candidates of a round alike, so a ratio is taken *per round* (paired) and the median of the
per-round ratios is reported, next to the plain ratio of the medians.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch


def rss_mib(peak: bool = True) -> float:
    """This process's resident set in MiB: its peak (``VmHWM``) or current size (``VmRSS``).

    Read from /proc/self/status, not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across fork + exec,
    so a child started by a larger parent would report the parent's peak. Falls back to
    ``ru_maxrss`` where /proc is missing.
    """
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_rss / 2**20 if sys.platform == "darwin" else peak_rss / 1024.0  # bytes on macOS, KiB elsewhere


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: Sequence[float]) -> Dict[str, Any]:
    """Median, min, max and interquartile range (seconds) of repeated timings."""
    ordered = sorted(times)
    quart = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_s": quart[2] - quart[0],
        "repeats": len(ordered),
        "all_s": list(times),
    }


def measure(cases: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each case, interleaved round by round after ``warmup`` calls each."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Dict[str, float]:
    """Median of per-round ratios (robust to drift), ratio of the medians, ratio of the minimums.

    On a machine shared with other jobs noise only ever adds time, so the ratio of the
    minimums is the least contaminated estimate; on a quiet machine all three agree.
    """
    rounds = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return {
        "median_of_paired": statistics.median(rounds) if rounds else float("nan"),
        "of_medians": statistics.median(numerator) / statistics.median(denominator),
        "of_minimums": min(numerator) / min(denominator),
    }


def unstable(times: Mapping[str, Sequence[float]], spread: float = 1.5) -> List[str]:
    """Cases whose slowest repeat took more than ``spread`` x their fastest (a noisy machine)."""
    return [f"{name} (max/min {max(ts) / min(ts):.1f})" for name, ts in times.items()
            if ts and min(ts) > 0 and max(ts) / min(ts) > spread]


class CpuShare:
    """Context manager: share of this process's threads actually on a CPU while it ran.

    ``process_time`` / (wall time x torch threads): near 1 on an idle machine; well below 1
    means other processes took the cores and the timings inside are inflated and noisy.
    """

    def __enter__(self) -> "CpuShare":
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self.share: Optional[float] = None
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.wall0
        if wall > 0:
            self.share = (time.process_time() - self.cpu0) / (wall * torch.get_num_threads())


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux) or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(repo: Path) -> Optional[str]:
    """HEAD of the checkout the benchmark ran from (None outside git), '+dirty' if modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load average: other processes competing for the CPU skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, repo: Path) -> Dict[str, Any]:
    """What a reader needs to interpret the numbers: hardware, software, threads, load."""
    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_start": load_average(),
        "git_commit": _git_commit(repo),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def fmt_ms(seconds: Optional[float]) -> str:
    """Seconds -> 'x.y ms' for tables ('-' when missing)."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def fmt_ratio(value: Optional[float]) -> str:
    """A ratio as 'x.xxx' ('-' when missing)."""
    return "-" if value is None else f"{value:.3f}x"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
