"""Keep freed memory for reuse in medseg's own processes (glibc's ``mallopt``), instead of returning it to the system.

By default glibc serves every allocation above 128 KB to 32 MB with a fresh ``mmap`` and unmaps it when freed, so each
new full-size volume, sliding-window output and convolution buffer is new memory that the kernel must fault in and
zero, page by page: on small CPU machines that is a large share of a 3D convolution's and a sliding window's time
(figures and the command that measures them: benchmarks/README.md). PyTorch's CPU tuning guide recommends jemalloc or
tcmalloc for the same reason; this gets most of it from the allocator already loaded.

The cost: a process's memory stays at its peak until it exits (what it frees is reused, not returned). So this is
done only in processes that are medseg's own (the ``medseg`` command, the flow scripts), never on import, and left
alone where the user tuned the allocator (``GLIBC_TUNABLES``, ``MALLOC_*_`` variables) or glibc is not the C library.
"""

from __future__ import annotations

import os
import sys

__all__ = ["keep_freed_memory", "GLIBC_SETTINGS", "glibc_environment"]

_LARGEST = 2**31 - 1  # mallopt takes an int
# glibc's malloc.h parameter numbers, and the values set: no mmap below 2 GB, no trimming, 256 MB of headroom
GLIBC_SETTINGS = {"MMAP_THRESHOLD": (-3, _LARGEST), "TRIM_THRESHOLD": (-1, _LARGEST), "TOP_PAD": (-2, 256 << 20)}


def glibc_environment() -> dict[str, str]:
    """The same settings as environment variables, for another program started with them (a benchmark's peer runs
    with the allocator medseg gives itself)."""
    return {f"MALLOC_{name}_": str(value) for name, (_, value) in GLIBC_SETTINGS.items()}


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it; True when glibc took the settings."""
    if not sys.platform.startswith("linux") or any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")
                                                   for k in os.environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(number, value) for number, value in GLIBC_SETTINGS.values()])
