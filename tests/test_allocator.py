"""Training keeps freed memory for the next step (glibc; peftkit/model/allocator.py): a freed
large tensor's pages stay in the process for the next allocation instead of going back to the
kernel (and being faulted in again)."""

import subprocess
import sys

import pytest

from peftkit.model import allocator

# Resident memory (MiB) after a 64 MiB tensor is written and freed, above what it was before.
SCRIPT = """
import os, sys, torch
from peftkit.model import allocator
if sys.argv[1] == "kept":
    assert allocator.keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
t = torch.empty(16 * 2**20).fill_(1.0)
del t
print(rss() - before)
"""


def kept_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, env={"PATH": "", "OMP_NUM_THREADS": "1"})
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_stays_in_the_process_only_when_kept():
    # glibc's default: 64 MiB is served by its own mmap and unmapped on free
    assert kept_after_free("default") < 8
    assert kept_after_free("kept") > 56


def test_users_malloc_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # not a tunable's name (no trailing _)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.setattr(allocator, "_libc", lambda: pytest.fail("mallopt called"))
    assert allocator.user_tuned() and allocator.keep_freed_memory() is False


def test_switched_off_for_the_ablation(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", False)
    monkeypatch.setattr(allocator, "ENABLED", False)
    monkeypatch.setattr(allocator, "_libc", lambda: pytest.fail("mallopt called"))
    assert allocator.keep_freed_memory() is False
