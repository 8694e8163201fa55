"""Reading a slice's runs into its slot with one `preadv` per run, bypassing the page cache where possible.

Modes: "direct" (O_DIRECT on Linux, F_NOCACHE on macOS), "buffered+dontneed" (buffered reads, then
posix_fadvise DONTNEED so the page cache does not keep a second copy), "buffered". "auto" tries direct per
file and falls back to buffered+dontneed where the filesystem refuses it (tmpfs answers EINVAL).
"""

import errno
import os
import sys
import threading
from collections.abc import Iterable

from ..errors import ExpertPagerError
from .reads import BLOCK, Run

MODES = ("auto", "direct", "buffered+dontneed", "buffered")


def drop_page_cache(path: "str | os.PathLike") -> None:
    """Write back and drop `path`'s pages from the OS page cache, so the next read of it is a real disk read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _open_direct(path: str) -> int:
    if hasattr(os, "O_DIRECT"):
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    if sys.platform == "darwin":
        import fcntl

        fd = os.open(path, os.O_RDONLY)
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd
    raise OSError(errno.EINVAL, "no direct I/O on this platform")


class Files:
    """One open descriptor per file in its effective mode; thread-safe positional reads into slots. keep_open=False
    instead opens and closes a file around each read (files that a store may create, delete and replace)."""

    def __init__(self, paths: Iterable[str], mode: str = "auto", keep_open: bool = True):
        if mode not in MODES:
            raise ExpertPagerError(f"unknown io mode {mode!r}: use one of {', '.join(MODES)}")
        self.requested = mode
        self.keep_open = keep_open
        self.modes: dict[str, str] = {}
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []
        self._lock = threading.Lock()
        if keep_open:
            for path in sorted(set(paths)):
                self._open(path)

    def _open(self, path: str) -> tuple[int, str]:
        """A new descriptor for `path` in its mode (found at its first open), recorded when files are kept open."""
        mode = self.modes.get(path, self.requested)
        try:
            if mode in ("auto", "direct"):
                try:
                    fd, mode = _open_direct(path), "direct"
                except OSError as e:
                    if e.errno != errno.EINVAL or mode == "direct":
                        raise
                    fd, mode = os.open(path, os.O_RDONLY), "buffered+dontneed"
            else:
                fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ExpertPagerError(f"cannot open {path} for io mode {self.requested!r}: {e.strerror}") from e
        self.modes[path] = mode
        if self.keep_open:
            self._fds[path] = fd
        return fd, mode

    def _fall_back(self, path: str, fd: int) -> None:
        """The filesystem accepted O_DIRECT at open but refuses the reads: switch this file to buffered."""
        with self._lock:
            if self.keep_open and self._fds[path] == fd:
                self._retired.append(fd)
                self._fds[path] = os.open(path, os.O_RDONLY)
            self.modes[path] = "buffered+dontneed"

    def read(self, run: Run, slot: memoryview) -> None:
        """Fill the slot with the run's bytes; raise ExpertPagerError naming file and offset if any are missing."""
        while True:
            if self.keep_open:
                with self._lock:  # a pair: another thread's fall-back changes both
                    fd, mode = self._fds[run.file], self.modes[run.file]
            else:
                fd, mode = self._open(run.file)
            try:
                if mode == "direct":
                    self._read_direct(fd, run, slot)
                else:
                    self._read_buffered(fd, run, slot, mode == "buffered+dontneed")
                return
            except OSError as e:
                if mode == "direct" and e.errno == errno.EINVAL and self.requested == "auto":
                    self._fall_back(run.file, fd)
                    continue
                raise ExpertPagerError(
                    f"cannot read {run.file} at offset {run.need_start} ({run.need_end - run.need_start} bytes): {e.strerror}"
                ) from e
            finally:
                if not self.keep_open:
                    os.close(fd)

    @staticmethod
    def _read_direct(fd: int, run: Run, slot: memoryview) -> None:
        target = slot[run.slot_offset : run.slot_offset + run.length]
        got = 0
        while got < run.length:
            n = os.preadv(fd, [target[got:]], run.start + got)
            got += n
            if n == 0 or n % BLOCK:  # end of file: the last block is short
                break
        _check(run, run.start + got)

    @staticmethod
    def _read_buffered(fd: int, run: Run, slot: memoryview, dontneed: bool) -> None:
        begin = run.slot_offset + run.need_start - run.start
        target = slot[begin : begin + run.need_end - run.need_start]
        got = 0
        while got < len(target):
            n = os.preadv(fd, [target[got:]], run.need_start + got)
            if n == 0:
                break
            got += n
        if dontneed and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, run.need_start, run.need_end - run.need_start, os.POSIX_FADV_DONTNEED)
        _check(run, run.need_start + got)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()


def _check(run: Run, end: int) -> None:
    if end < run.need_end:
        raise ExpertPagerError(
            f"short read from {run.file} at offset {end}: the file ends before offset {run.need_end} that the layout needs"
        )
