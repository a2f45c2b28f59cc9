"""What every benchmark asks of the machine: its CPU, its busy time, and a quiet moment.

Imported by the benchmark scripts beside it (run as ``python benchmarks/bench_*.py``, which
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import time


def cpu_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat.

    Machine-wide because worker processes descend from a fork server or a dask nanny, not
    from the benchmark; run it on an otherwise idle machine.
    """
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_for_idle(max_wait_s: float, idle_fraction: float = 0.9) -> float:
    """Wait (at most ``max_wait_s``) until other work leaves the machine ``idle_fraction``
    idle over 1.5 s; returns the idle fraction last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, t0 = cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        idle = 1.0 - (cpu_seconds() - busy0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if idle >= idle_fraction or time.monotonic() > deadline:
            return idle
