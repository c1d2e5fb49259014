"""Keep the memory an audit frees for its next batch, instead of handing it back to the kernel.

Every batch allocates and frees the same few arrays (packed keys, histograms, α's bins), from
several threads. glibc's malloc gives large freed blocks back to the kernel at once (its
thresholds start at 128 KiB), so each batch faults the same pages in again: measured on LeNet-5
(16,32,64) over 60,000 MNIST images, 270,000 page faults and 1.2 s of system time against
0.2 s for plain inference, a fifth of the audit's CPU (docs/performance.md). Fixed thresholds
of 32 MiB (blocks below it come from malloc's heaps) and 64 MiB (free memory a heap may keep)
bring the faults down to 37,000 and the peak resident memory up by about 8 MiB.

This is a process-wide setting, so it is applied once, only on glibc, and never where the user
has set these thresholds already: ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_``, or the same ``glibc.malloc`` tunables in
``GLIBC_TUNABLES``. Setting any of them (for instance ``MALLOC_TRIM_THRESHOLD_=131072``, glibc's
own starting value) keeps the process's malloc as the user configured it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; blocks below it are reused, not mapped anew
TRIM_THRESHOLD = 64 << 20  # free memory a heap keeps before it is returned
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = tuple(f"glibc.malloc.{name}" for name in ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max"))


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for the audit's batches, once; whether they were set."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in USER_VARIABLES) or any(name in tunables for name in USER_TUNABLES):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
