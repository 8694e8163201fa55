"""A whole remote file's SHA-256 computed from what a store holds of it: byte ranges in local files (the skeleton's
header and resident tensors, slice files), and the few bytes none of them covers (alignment padding, tensors no layout
uses) read by range, neighbours together. Streams: at most CHUNK bytes of a local file and one request's worth
(http.MAX_REQUEST) of the remote in memory."""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from .http import MAX_REQUEST, coalesce

CHUNK = 8 << 20

Piece = tuple[int, int, Path, int]  # bytes [start, end) of the remote file are bytes [at, at + end - start) of a local file


def cover(size: int, pieces: list[Piece]) -> list[tuple[int, int, Path | None, int]]:
    """[0, size) as consecutive ranges, each read from the first piece that covers it (pieces may overlap), or None
    where no piece does."""
    out: list[tuple[int, int, Path | None, int]] = []
    pos = 0
    for start, end, path, at in sorted(pieces, key=lambda p: p[0]):
        end = min(end, size)
        if end <= pos:
            continue
        if start > pos:
            out.append((pos, start, None, 0))
        begin = max(start, pos)
        out.append((begin, end, path, at + begin - start))
        pos = end
    if pos < size:
        out.append((pos, size, None, 0))
    return out


def file_sha256(size: int, pieces: list[Piece], read_remote: Callable[[int, int], bytes],
                advance: Callable[[int], None] = lambda n: None) -> str:
    """The SHA-256 of a file of `size` bytes: `pieces` from local files, the rest from read_remote(start, length) in
    coalesced spans of at most MAX_REQUEST bytes; advance(n) after each n bytes hashed. A local file gone meanwhile
    (evicted) raises FileNotFoundError."""
    ranges = cover(size, pieces)
    spans = iter(coalesce(g for start, end, path, _ in ranges if path is None for g in _split(start, end)))
    span, data = (0, 0), b""
    digest = hashlib.sha256()
    for start, end, path, at in ranges:
        if path is None:
            for s, e in _split(start, end):
                while not span[0] <= s < span[1]:
                    span = next(spans)
                    data = read_remote(span[0], span[1] - span[0])
                digest.update(data[s - span[0]: e - span[0]])
                advance(e - s)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            for s in range(start, end, CHUNK):
                n = min(CHUNK, end - s)
                chunk = os.pread(fd, n, at + s - start)
                if len(chunk) != n:
                    raise FileNotFoundError(f"{path}: shorter than the store expects")
                digest.update(chunk)
                advance(n)
        finally:
            os.close(fd)
    return digest.hexdigest()


def _split(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) in ranges of at most MAX_REQUEST bytes (so no coalesced span is longer)."""
    return [(s, min(s + MAX_REQUEST, end)) for s in range(start, end, MAX_REQUEST)]
