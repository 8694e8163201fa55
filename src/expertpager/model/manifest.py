"""The repacked layout: a folder whose `expertpager.json` manifest lists every expert slice as one 4 KiB-aligned
byte range (parts back to back, gate then up) with a SHA-256 checksum; resident tensors sit in one file beside it
in the source's format (model.safetensors + config.json, or resident.gguf with the GGUF metadata)."""

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import ExpertPagerError
from .architectures import resident_category
from .layout import ExpertSlice, Layout, ResidentTensor, TensorPart
from .tensors import read_gguf_header, read_safetensors_header

MANIFEST = "expertpager.json"
MANIFEST_FORMAT = "expertpager-repacked/1"
ALIGN = 4096
RESIDENT_FILES = {"gguf": "resident.gguf", "safetensors": "model.safetensors"}


def slice_digest(chunks: Iterable) -> str:
    """SHA-256 of a slice's bytes (its parts in file order), hex."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def read_manifest(folder: Path) -> Layout:
    """The layout of a repacked folder; every range is checked against its file."""
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
        if m.get("format") != MANIFEST_FORMAT:
            raise ExpertPagerError(f"{path}: not an expertpager manifest (format {m.get('format')!r}, expected {MANIFEST_FORMAT!r})")
        source = m["source_format"]
        resident_file = folder / RESIDENT_FILES[source]
        slices, checksums = {}, {}
        for entry in m["slices"]:
            s, digest = _slice(folder, path, entry)
            slices[s.key] = s
            checksums[s.key] = digest
        arch, layers, moe_layers = m["architecture"], int(m["num_layers"]), [int(x) for x in m["moe_layers"]]
        num_experts, top_k = int(m["num_experts"]), int(m["experts_per_token"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExpertPagerError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from None
    if source == "gguf":
        tensors, config = read_gguf_header(str(resident_file))
    else:
        from .read_layout import read_config, text_settings

        tensors, config = read_safetensors_header(str(resident_file))[0], text_settings(read_config(folder))
    resident = [ResidentTensor(t.name, t.file, t.offset, t.length, t.dtype, t.shape, resident_category(t.name)) for t in tensors]
    missing = [k for k in ((layer, e) for layer in moe_layers for e in range(num_experts)) if k not in slices]
    if missing:
        raise ExpertPagerError(f"{path}: no entry for expert slice {missing[0]} (layer, expert)")
    files = sorted({str(resident_file)} | {p.file for s in slices.values() for p in s.parts})
    return Layout("repacked", arch, str(folder), files, layers, moe_layers, num_experts, top_k, slices, resident, config,
                  source_format=source, checksums=checksums, quantize=m.get("quantize"))


def _slice(folder: Path, manifest: Path, entry: dict) -> tuple[ExpertSlice, str]:
    layer, expert = int(entry["layer"]), int(entry["expert"])
    file = folder / entry["file"]
    offset, length = int(entry["offset"]), int(entry["length"])
    try:
        size = os.path.getsize(file)
    except OSError:
        raise ExpertPagerError(f"{manifest}: slice ({layer}, {expert}) names file {entry['file']!r}, which does not exist") from None
    if offset % ALIGN or offset < 0 or offset + length > size:
        raise ExpertPagerError(f"{manifest}: slice ({layer}, {expert}) at bytes [{offset}, {offset + length}) does not fit "
                               f"{entry['file']} ({size} bytes) or is not {ALIGN}-aligned; the manifest disagrees with its files")
    parts, pos = [], offset
    for p in entry["parts"]:
        if int(p["offset"]) != pos:
            raise ExpertPagerError(f"{manifest}: slice ({layer}, {expert}) part {p['role']!r} is not contiguous with the one before")
        parts.append(TensorPart(p["role"], str(file), pos, int(p["length"]), p["dtype"], tuple(p["shape"])))
        pos += int(p["length"])
    if pos != offset + length:
        raise ExpertPagerError(f"{manifest}: slice ({layer}, {expert}) parts add up to {pos - offset} bytes, not {length}")
    return ExpertSlice(layer, expert, tuple(parts)), entry["sha256"]
