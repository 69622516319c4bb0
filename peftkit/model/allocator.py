"""Freed tensor memory kept in the process (glibc), so the next step reuses it without faults.

A training step allocates and frees the same large tensors every step (activations, their
gradients, matmul outputs: tens of MB each for a real model's packed rows). glibc's malloc
serves blocks that large with fresh `mmap`s and gives them back on free (and trims the heap's
free top), so every step touches new pages: one page fault and a zeroed 4 KiB page at a time,
inside the matmuls and copies that first write them. Measured alone (2 cores): a 4242 x 576 x
1536 float32 matmul (a SmolLM2 MLP projection over a packed row) runs at 158 GFLOP/s into a
fresh output and 181 into a reused one.

`keep_freed_memory` tells glibc (mallopt) to serve every block from its heap (no mmap) and not
to give the heap's free top back to the system. Freed blocks are reused, not added to: on the
small benchmark, 1.06-1.17x useful tokens/s in 4 paired rounds, the same peak memory, 3-4x
fewer page faults (not zero: torch's 64-byte-aligned requests do not always fit a freed
block); on the real model no gain shows through the host's noise (peak +0.03-0.10 GB). Memory
freed after the peak goes back when the process exits. Measured in docs/benchmarks.md ("Where
a CPU step goes") and benchmarks/ablation.py ("+ freed memory kept").

Measuring peak memory in a process that kept freed memory would see the earlier work's freed
blocks as already resident: `release_free_memory` (malloc_trim) hands them back first, and
memory.PeakMemory calls it before it reads the RSS it measures from.

Used for single-process and DDP runs on CPU (training.setup). Not for sharded runs (FSDP,
ZeRO-3): their per-layer gathers are exactly what a smaller mmap threshold returns early,
which keeps their peak low (benchmarks/sharded_memory.py), and not where the user set any
MALLOC_* variable (theirs wins). Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# Bytes free at the heap's top before glibc returns them: never. mallopt takes an int and glibc
# converts it to size_t, so -1 is SIZE_MAX (what MALLOC_TRIM_THRESHOLD_ can also say). A
# finite value would not do: a real model's step frees several GB at once (its activations).
TRIM_ABOVE = -1
TOP_PAD = 64 * 2**20  # extra bytes per heap growth: fewer brk calls

ENABLED = True  # benchmarks/ablation.py switches it off to measure what it buys
_DONE = False


def user_tuned() -> bool:
    """Whether the user set glibc's malloc tunables themselves (MALLOC_*_ or GLIBC_TUNABLES)."""
    return "GLIBC_TUNABLES" in os.environ or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:  # not glibc
        return None


def release_free_memory() -> bool:
    """Return the heap's free memory to the system now (glibc malloc_trim); True if any."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); True if it now does."""
    global _DONE
    if _DONE or not ENABLED or user_tuned():
        return _DONE
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; set the trim threshold first (it also fixes the mmap
    # threshold, which M_MMAP_MAX = 0 then makes moot).
    _DONE = bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) and mallopt(M_TOP_PAD, TOP_PAD)
                 and mallopt(M_MMAP_MAX, 0))
    return _DONE
