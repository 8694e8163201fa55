"""Advisory file locks (fcntl.flock) that let several processes share one store folder. The folder's lock file is
held exclusively around every change to the folder (skeleton and store.json, a slice written or evicted) and holds a
generation number each change of the slice files bumps, so a process knows when another one changed them. A slice
being read is held with a shared lock on its own file, which eviction, taking it exclusively without waiting, skips.
flock locks belong to an open file, so threads of one process exclude each other the same way."""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "store.lock"


@contextmanager
def store_locked(folder: Path) -> Iterator[int]:
    """Hold `folder`'s exclusive lock (waiting for other processes' changes to finish); yields the lock file's
    descriptor for generation and bump."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def generation(fd: int) -> int:
    """The number of changes to the slice files so far, read from the held lock file."""
    return int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")


def bump(fd: int) -> int:
    """Count one more change to the slice files; returns the new generation."""
    n = generation(fd) + 1
    os.pwrite(fd, n.to_bytes(8, "little"), 0)
    return n


def hold_shared(path: Path) -> int | None:
    """A descriptor of `path` holding a shared lock, so no process evicts the file while it is held; None when the
    file is gone (evicted meanwhile)."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while another process is deleting this very file
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            os.close(fd)
            return None
        os.close(fd)  # replaced by a fresh copy meanwhile: hold that one


def delete_unless_held(path: Path) -> bool:
    """Delete `path` unless a process holds it (hold_shared); True when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return True
