"""glibc's heap hands freed memory back to the system: a load that builds and drops many large temporaries (a
vocabulary-sized matrix packed 4,096 rows at a time) would otherwise keep them in RSS, against a memory cap."""

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3


@contextmanager
def returning_freed_memory(threshold: int = 1 << 16) -> Iterator[None]:
    """Allocations of `threshold` bytes or more are mapped on their own (freed at once, no growing heap), and free
    heap memory is returned at the end. A no-op where the C library is not glibc."""
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
