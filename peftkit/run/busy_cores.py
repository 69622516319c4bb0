"""OpenMP threads on a machine whose cores other processes already keep busy.

PyTorch's CPU kernels run on OpenMP threads that by default spin while they wait for each
other. On cores that other processes keep busy, a spinning thread burns the time slice the
thread it waits for needs. Measured on 2 cores with two busy loops beside the run (the small
benchmark recipe, `peftkit bench benchmarks/recipes/small.py --steps 6`): 87 useful tokens/s
with spinning threads, 383 with sleeping ones (`OMP_WAIT_POLICY=PASSIVE`); on the quiet
machine 927 and 833. So when a command starts on busy cores, peftkit asks for passive
waiting, unless the user chose a policy. The OpenMP runtime reads the variable when it loads
(with torch), so this runs before torch is imported; processes started later inherit it.
"""

from __future__ import annotations

import os
import sys
import time

BUSY_LOAD = 0.75  # 1-minute load average, as a share of the cores this process may use
BUSY_NOW = 0.5  # share of those cores busy over the last SAMPLE_S seconds
SAMPLE_S = 0.2


def busy_cores(load: float, busy_now: float, cores: int) -> bool:
    """Whether other work keeps the cores busy: busy for the last minute and still busy now
    (the load average alone also counts a run that just ended, such as the previous one)."""
    return load >= BUSY_LOAD * cores and busy_now >= BUSY_NOW


def _cpu_busy_share(seconds: float) -> float:
    """Share of all CPUs busy over `seconds` (Linux /proc/stat); 1.0 where unreadable, so the
    load average decides alone."""
    def times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return 1.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_passively_on_busy_cores() -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when the cores are busy as a command starts; the note to
    print, or None when nothing changed (the user set a policy, torch is already loaded, this
    is a worker of a launcher that decided already, or the cores are free)."""
    if ("OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules
            or "LOCAL_RANK" in os.environ or not hasattr(os, "getloadavg")):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    load = os.getloadavg()[0]
    if load < BUSY_LOAD * cores:  # the cheap test first: no sampling on a quiet machine
        return None
    busy = _cpu_busy_share(SAMPLE_S)
    if not busy_cores(load, busy, cores):
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return (f"note: the CPU is busy with other work (1-minute load {load:.1f} on {cores} "
            f"cores, {busy:.0%} busy now): torch's threads will sleep, not spin, while they "
            "wait (OMP_WAIT_POLICY=PASSIVE, several times faster on shared cores); set "
            "OMP_WAIT_POLICY yourself to choose")
