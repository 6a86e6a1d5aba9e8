"""Hand freed heap memory back to the OS after each batch.

NOTE: measured in a 10-minute soak: the executor's RSS grew by 1.4 GiB because batches of varying
shapes fragment glibc's heap (large tensors outgrow its dynamic mmap threshold and land on the
heap, where freed holes are kept). `malloc_trim(0)` after every batch kept RSS flat at no
measurable cost; forcing every large allocation through mmap instead cost ~25 % throughput.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_trim = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)
