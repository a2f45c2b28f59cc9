"""When to run the network in bf16: on CUDA always, on a CPU only where it has bf16 units.

A CPU with AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``) computes bf16 convolutions in
hardware, and autocast then trains and infers faster than fp32 (benchmarks/bench_precision.py
measures it). Without those units PyTorch emulates bf16 and it is slower than fp32, so
``auto`` keeps fp32 there. The flags come from /proc/cpuinfo (Linux); elsewhere none are known
and ``auto`` means fp32 on the CPU.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from gsd_wsi.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> tuple[str, ...]:
    """The bf16 instruction sets this CPU reports (``amx_bf16``, ``avx512_bf16``), maybe none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in BF16_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``bf16`` yes, ``fp32`` no, ``auto`` on CUDA and on CPUs with bf16 units."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and bool(cpu_bf16_units()))
