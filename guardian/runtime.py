"""Process settings for serving judges on a small CPU machine.

glibc's malloc raises its trimming and mmap thresholds as large blocks are freed, so the varied
tensor sizes of batch scoring (every batch has its own padded length) leave a few hundred MB of
freed memory held in the heap. `limit_heap_retention` fixes the trim threshold, which turns that
adaptation off: freed memory is handed back to the system and the peak resident size stays lower.
It fixes the mmap threshold too (at 32 MiB), since turning the adaptation off would otherwise leave
it at glibc's 128 KiB: every activation tensor would then be a fresh mapping whose pages fault in
on first touch, which made scoring and training about twice as slow.

Importing this module (the package does it first) also caps PyTorch's oneDNN primitive cache
(`LRU_CACHE_CAPACITY`, default 1024 entries), which otherwise keeps about 50 MB of bfloat16 matrix
kernels for batch shapes that rarely come back. It only takes effect if torch is not imported yet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
TRIM_THRESHOLD = 1 << 20  # hand back free heap memory above 1 MiB
MMAP_THRESHOLD = 32 << 20  # blocks above 32 MiB get their own mapping; smaller ones reuse heap memory


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # another C library (musl) may have neither
        return None


def limit_heap_retention(trim_threshold: int = TRIM_THRESHOLD, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc return freed heap memory above `trim_threshold` bytes; False where not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))
                                     and libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))


def release_free_memory() -> bool:
    """Hand freed heap memory back to the system now (glibc's `malloc_trim`); False where not glibc.

    Worth calling after a large job (training an update, scoring a big file): the job's freed
    buffers otherwise stay resident until the heap is reused.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
