"""CPU allocator tuning.

glibc's malloc hands large freed blocks (above its mmap threshold) back to the operating
system, so a loop that allocates the same m×m temporaries on every step page-faults them in
again every time. On a 2-core CPU that costs about as much as the Gram GEMMs of a small MLP
(measured: EGN direction 6.9 ms → 4.6 ms for 784-256-256-10, b = 64). CUDA tensors are not
affected (torch's caching allocator keeps them).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["reuse_cpu_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_cpu_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks of up to `mmap_threshold` bytes for reuse (process-wide).

    Sets M_MMAP_THRESHOLD (glibc caps it at 32 MiB on 64-bit) and M_TRIM_THRESHOLD, like the
    environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_. The process keeps
    up to `trim_threshold` bytes of freed heap instead of returning it to the system. Returns
    False (and changes nothing) where the C library has no mallopt (not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
