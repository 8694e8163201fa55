"""A remote checkpoint's local skeleton: small files fetched whole, and each weight file as a sparse file of its
remote size holding only its header (safetensors: the 8-byte length + JSON header; GGUF: everything before the tensor
data, read by gguf-py) and, once fetched, its resident tensors at their own offsets. The model layer's header readers,
transformers and the tokenizer then read it as a local checkpoint; expert bytes stay holes, never read."""

import os
import struct
from collections.abc import Callable
from pathlib import Path

from ..errors import ExpertPagerError
from ..model.tensors import MAX_HEADER_BYTES
from .http import MAX_REQUEST, RangeClient, coalesce
from .refs import RemoteFile, RemoteModel

GGUF_FIRST_READ = 1 << 20


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, size: int, fill: Callable[[int], None]) -> None:
    """Create `path` of `size` bytes (sparse) under a temporary name, let `fill(fd)` write into it, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fetch_skeleton(folder: Path, model: RemoteModel, client: RangeClient) -> int:
    """Write every file of `model` not yet in `folder`: small files whole, weight files as header skeletons.
    Returns the bytes the skeleton takes on disk (skeleton_bytes)."""
    for name, f in model.files.items():
        path = folder / name
        if path.exists():
            continue
        if name in model.weights:
            _write_header(path, f, model, client)
        else:
            write_atomic(path, f.size, lambda fd, f=f: pwrite_all(fd, client.read(f.url, 0, f.size, model.headers), 0)
                         if f.size else None)
    return skeleton_bytes(folder, model)


def skeleton_bytes(folder: Path, model: RemoteModel) -> int:
    """Bytes the skeleton takes on disk: small files, and the blocks allocated to the sparse weight files (their
    headers, and resident tensors once fetched)."""
    return sum(os.stat(folder / n).st_blocks * 512 if n in model.weights else f.size for n, f in model.files.items())


def header_end(path: Path) -> int:
    """Where the header a skeleton weight file holds ends (what _write_header wrote): safetensors 8 + its JSON length,
    GGUF its tensor data's offset, a repacked expert file 0."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as fh:
            return 8 + struct.unpack("<Q", fh.read(8))[0]
    if path.suffix == ".gguf":
        import gguf

        return int(gguf.GGUFReader(path, "r").data_offset)
    return 0


def _write_header(path: Path, f: RemoteFile, model: RemoteModel, client: RangeClient) -> None:
    if path.suffix == ".safetensors":
        head = _safetensors_header(f, model, client)
    elif path.suffix == ".gguf":
        head = _gguf_header(path, f, model, client)
    else:
        head = b""  # a repacked expert file: slices only, fetched into the store's slice files
    write_atomic(path, f.size, lambda fd: pwrite_all(fd, head, 0))


def _safetensors_header(f: RemoteFile, model: RemoteModel, client: RangeClient) -> bytes:
    if f.size < 8:
        raise ExpertPagerError(f"{f.url}: not a safetensors file ({f.size} bytes, shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", client.read(f.url, 0, 8, model.headers))
    if n > MAX_HEADER_BYTES or 8 + n > f.size:
        raise ExpertPagerError(f"{f.url}: truncated or corrupt safetensors file (header of {n} bytes, file of {f.size})")
    return client.read(f.url, 0, 8 + n, model.headers)


def _gguf_header(path: Path, f: RemoteFile, model: RemoteModel, client: RangeClient) -> bytes:
    """The bytes before a GGUF's tensor data: read a first MiB, let gguf-py parse a sparse file holding them, and
    read twice as much while the parse fails or reaches past what was read."""
    import gguf

    n, probe = min(f.size, GGUF_FIRST_READ), temp_path(path.with_name(path.name + ".head"))
    head = b""
    try:
        while True:
            head += client.read(f.url, len(head), n - len(head), model.headers)
            write_atomic(probe, f.size, lambda fd: pwrite_all(fd, head, 0))
            try:
                end = gguf.GGUFReader(probe, "r").data_offset
            except Exception as e:  # gguf-py raises ValueError, IndexError, ... on a cut or corrupt header
                if n == f.size:
                    raise ExpertPagerError(f"{f.url}: not a valid GGUF file ({type(e).__name__}: {e})") from None
                end = n + 1
            if end <= n:
                return head[:end]
            n = min(f.size, 2 * n)
    finally:
        probe.unlink(missing_ok=True)


def fetch_ranges(path: Path, f: RemoteFile, ranges: list[tuple[int, int]], model: RemoteModel, client: RangeClient,
                 advance: Callable[[int], None] = lambda n: None) -> None:
    """Write bytes [start, end) of the remote file for each range into the local skeleton file at the same offsets
    (ranges close together go in one request: coalesce), then fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for start, end in coalesce(ranges):
            for at in range(start, end, MAX_REQUEST):
                n = min(MAX_REQUEST, end - at)
                pwrite_all(fd, client.read(f.url, at, n, model.headers), at)
                advance(n)
        os.fsync(fd)
    finally:
        os.close(fd)
