"""Keep freed memory for reuse in medseg's own processes (glibc's ``mallopt``), instead of returning it to the system.

By default glibc serves every allocation above 128 KB to 32 MB with a fresh ``mmap`` and unmaps it when freed, so each
new full-size volume, sliding-window output and convolution buffer is new memory that the kernel must fault in and
zero, page by page. On the 2-core CI-class VMs this project is measured on, that doubled the time of a 3D
convolution (ten 16-channel 128x128x64 convolutions: 2.6 s, 1.5 s with freed memory kept) and cost 15% of a CT's
sliding-window inference. PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same reason; this gets
most of it from the allocator already loaded. Measured by ``benchmarks/predict.py`` (``--allocator``).

The cost: a process's memory stays at its peak until it exits (what it frees is reused, not returned). So this is
done only in processes that are medseg's own (the ``medseg`` command, the flow scripts), never on import, and left
alone where the user tuned the allocator (``GLIBC_TUNABLES``, ``MALLOC_*_`` variables) or glibc is not the C library.
"""

from __future__ import annotations

import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_LARGEST = 2**31 - 1  # mallopt takes an int


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
    return all([mallopt(_M_MMAP_THRESHOLD, _LARGEST), mallopt(_M_TRIM_THRESHOLD, _LARGEST),
                mallopt(_M_TOP_PAD, 256 << 20)])
