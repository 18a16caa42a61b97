"""Process settings for serving judges on a small CPU machine.

glibc's malloc raises its trimming and mmap thresholds as large blocks are freed, so the varied
tensor sizes of batch scoring (every batch has its own padded length) leave a few hundred MB of
freed memory held in the heap. `limit_heap_retention` fixes the trim threshold, which turns that
adaptation off: freed memory is handed back to the system and the peak resident size stays lower.

Importing this module (the package does it first) also caps PyTorch's oneDNN primitive cache
(`LRU_CACHE_CAPACITY`, default 1024 entries), which otherwise keeps about 50 MB of bfloat16 matrix
kernels for batch shapes that rarely come back. It only takes effect if torch is not imported yet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
TRIM_THRESHOLD = 1 << 20  # hand back free heap memory above 1 MiB


def limit_heap_retention(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc return freed heap memory above `trim_threshold` bytes; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):  # another C library (musl) has no mallopt
        return False
