"""Keep freed tensor memory in the process while training on CPU (glibc only).

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised adaptively) with a fresh
mmap and unmaps it on free, and trims the heap's top back to the kernel past its trim threshold. A CPU training
step allocates and frees the same few hundred activation-sized blocks (4-9 MB each at the demo's size) every
step, so each of them was page-faulted in and zeroed by the kernel again: 4,000-8,000 minor faults a step, 1-6
with the thresholds raised (BENCHMARKS.md, "step (issue 26), session 3"). Raising both
thresholds keeps those pages mapped between steps -- the same effect as PyTorch's CPU tuning guide's advice to
preload jemalloc or tcmalloc, without a dependency. The cost: resident memory stays at the step's peak.

EVIM3_MALLOC_TUNING=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

DISABLE_ENV = "EVIM3_MALLOC_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for it on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # an int: in effect, never trim


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True when they were set."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; True only when both took (one alone still faults on every step)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
