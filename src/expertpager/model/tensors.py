"""Tensor headers of safetensors and GGUF files, read without touching tensor data."""

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ExpertPagerError

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are. shape is numpy/torch order (slowest dimension first)."""

    name: str
    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str) -> tuple[list[TensorInfo], dict]:
    """Parse the 8-byte little-endian header length and JSON header; validate every range against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExpertPagerError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ExpertPagerError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise ExpertPagerError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpertPagerError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ExpertPagerError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = [_safetensors_entry(path, name, entry, base, size) for name, entry in header.items()]
    check_no_overlap(path, tensors)
    return tensors, metadata if isinstance(metadata, dict) else {}


def _safetensors_entry(path: str, name: str, entry, base: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        elem = SAFETENSORS_DTYPE_BYTES[dtype]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise ExpertPagerError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
    if end - begin != math.prod(shape) * elem or begin < 0:
        raise ExpertPagerError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] that disagree with its {dtype} shape {list(shape)}")
    if base + end > size:
        raise ExpertPagerError(f"{path}: tensor {name!r} ends at byte {base + end}, past the end of the file ({size} bytes); the file is truncated")
    return TensorInfo(name, path, base + begin, end - begin, dtype, shape)


def check_no_overlap(path: str, tensors: list[TensorInfo]) -> None:
    ordered = sorted((t for t in tensors if t.length), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.length:
            raise ExpertPagerError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the file")


def read_gguf_header(path: str) -> tuple[list[TensorInfo], dict]:
    """Tensor infos and scalar/string metadata of one GGUF file, via gguf.GGUFReader (memory-mapped; data untouched)."""
    import gguf

    try:
        size = os.path.getsize(path)
        reader = gguf.GGUFReader(path, "r")
        metadata = {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = []
        for t in reader.tensors:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            tensors.append(TensorInfo(t.name, path, int(t.data_offset), int(t.n_bytes), qtype.name,
                                      tuple(int(d) for d in reversed(t.shape.tolist()))))
    except ExpertPagerError:
        raise
    except OSError as e:
        raise ExpertPagerError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError, ... on corrupt input
        raise ExpertPagerError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
    for t in tensors:
        if t.offset + t.length > size:
            raise ExpertPagerError(f"{path}: tensor {t.name!r} ends at byte {t.offset + t.length}, past the end of the file ({size} bytes); the file is truncated")
    check_no_overlap(path, tensors)
    return tensors, metadata


def _field_value(field):
    """A GGUF metadata field as a Python scalar or string; short numeric arrays (per-layer values) as lists, other
    arrays (tokenizer vocab etc.) summarised by length."""
    import gguf

    kind = field.types[0] if field.types else None
    if kind == gguf.GGUFValueType.ARRAY:
        if field.types[-1] != gguf.GGUFValueType.STRING and len(field.data) <= 4096:
            return field.contents()
        return {"array_length": len(field.data)}
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]]
    return value.item() if isinstance(value, np.ndarray) and value.size == 1 else value.tolist()
