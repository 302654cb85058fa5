"""Numeric precision: the autocast policy and whether the hardware computes bf16 natively.

bf16 autocast is ~2.8x faster than float32 for the frozen towers on CPUs with AVX512-BF16 or
AMX (measured in benchmarks/speed.py) and *slower* on CPUs that emulate it, so ``auto`` uses it
only where the hardware has it.
"""
from __future__ import annotations

import contextlib
import functools
import platform

import torch

from capnet.errors import CapnetError

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo
BF16_ARM_FLAGS = ("bf16",)  # aarch64 "Features"
# Scores of a trained model (validation, thresholds, test, ``capnet eval``, ``predict``, export)
# are computed in float32 after the frozen prefix: every command ranks the same numbers. Only
# the training step uses ``train.amp``; the frozen prefix runs at ``FeaturePlan.extract_amp`` wherever
# torch runs it (the feature cache and ``predict``), so a run's cached and fresh features agree.
SCORE_AMP = "none"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for ``amp`` in none | auto | bf16 | fp16 (fp16 needs CUDA; auto: bf16 where native)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise CapnetError(f"train.amp={amp!r} is not one of none, auto, bf16, fp16")
    if amp == "fp16" and device.type != "cuda":
        raise CapnetError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags Linux reports (empty elsewhere or when unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA: Ampere or newer; CPU: AVX512-BF16 / AMX / ARM bf16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    flags = cpu_flags()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return any(f in flags for f in (BF16_ARM_FLAGS if arm else BF16_CPU_FLAGS))


def resolve_amp(choice: str, device: torch.device) -> str:
    """``train.amp`` / ``train.extract_amp`` with ``auto`` resolved: bf16 where ``device`` computes
    it natively, else none (emulated bf16 is slower than float32)."""
    if choice == "auto":
        return "bf16" if native_bf16(device) else "none"
    return choice
