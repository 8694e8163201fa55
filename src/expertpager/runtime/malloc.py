"""glibc's heap hands freed memory back to the system: a load that builds and drops many large temporaries (a
vocabulary-sized matrix packed 4,096 rows at a time) would otherwise keep them in RSS, against a memory cap.
After the load, a decode step's temporaries (up to the logits, 0.6 MB for a 151,936-token vocabulary) come from the
heap again: mapped on their own they cost about 500 page faults and 6 ms of system time a token (measured at
Qwen3-30B-A3B geometry)."""

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
RUNTIME_MMAP_THRESHOLD = 1 << 20  # after the load (glibc's own dynamic threshold cannot be restored once set)
RUNTIME_TRIM_THRESHOLD = 16 << 20


@contextmanager
def returning_freed_memory(threshold: int = 1 << 16) -> Iterator[None]:
    """Allocations of `threshold` bytes or more are mapped on their own (freed at once, no growing heap); at the end
    free heap memory is returned and the runtime thresholds set. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        trim(0)
        mallopt(M_MMAP_THRESHOLD, RUNTIME_MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, RUNTIME_TRIM_THRESHOLD)
