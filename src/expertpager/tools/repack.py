"""Rewrite a checkpoint into the expert-bundled layout (model/manifest.py): each slice's parts back to back (gate
then up, so a fused gate_up is one view), every slice 4 KiB-aligned and padded so a miss is one aligned read,
resident tensors in one file, and a manifest with a SHA-256 per slice. Written under a temporary name, renamed
at the end."""

import json
import os
import shutil
from pathlib import Path

import gguf
import torch

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, Layout
from ..model.manifest import ALIGN, MANIFEST, MANIFEST_FORMAT, RESIDENT_FILES, slice_digest
from ..model.read_layout import read_layout
from ..progress import progress_bar
from ..runtime.compact import compact_parts, transcode
from ..runtime.load import resolve_tier

FILE_MODES = ("single", "per-layer", "per-slice")
ROLE_ORDER = ("gate", "up", "gate_up", "down")
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja")  # config, generation config, tokenizer files


def _expert_file(mode: str, layer: int, expert: int) -> str:
    if mode == "single":
        return "experts.bin"
    if mode == "per-layer":
        return f"experts-{layer:04d}.bin"
    return f"experts/{layer:04d}-{expert:04d}.bin"


def _ordered(s: ExpertSlice) -> list:
    return sorted(s.parts, key=lambda p: (ROLE_ORDER.index(p.role) if p.role in ROLE_ORDER else len(ROLE_ORDER), p.role))


def _read(file: str, offset: int, length: int) -> bytes:
    with open(file, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise ExpertPagerError(f"{file}: short read at offset {offset}: the file is truncated")
    return data


def _pad(f) -> None:
    f.write(b"\0" * (-f.tell() % ALIGN))


def _compact_parts(s: ExpertSlice, requantize: bool) -> list[tuple[dict, bytes]]:
    """The slice transcoded to the compact tier's layout (runtime/compact.py): (part entry, bytes) per part."""
    roles = {p.role: p for p in s.parts}
    tensors = transcode(roles, {p.role: torch.frombuffer(bytearray(_read(p.file, p.offset, p.length)), dtype=torch.uint8)
                                for p in s.parts}, requantize)
    out = []
    for role, dtype, shape in compact_parts(s, requantize):
        data = tensors[role].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append(({"role": role, "dtype": dtype, "shape": list(shape)}, data))
    return out


def _write_slices(layout: Layout, tmp: Path, mode: str, progress: bool, compact: bool = False,
                  requantize: bool = False) -> list[dict]:
    entries, handles = [], {}
    try:
        with progress_bar(f"repack {Path(layout.path).name}", len(layout.slices), progress) as advance:
            for key in sorted(layout.slices):
                s = layout.slices[key]
                name = _expert_file(mode, *key)
                if name not in handles:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    handles[name] = open(tmp / name, "wb")
                f = handles[name]
                start, parts, chunks = f.tell(), [], []
                pieces = _compact_parts(s, requantize) if compact else [
                    ({"role": p.role, "dtype": p.dtype, "shape": list(p.shape)}, _read(p.file, p.offset, p.length))
                    for p in _ordered(s)]
                for entry, data in pieces:
                    parts.append({**entry, "offset": f.tell(), "length": len(data)})
                    f.write(data)
                    chunks.append(data)
                entries.append({"layer": key[0], "expert": key[1], "file": name, "offset": start,
                                "length": f.tell() - start, "sha256": slice_digest(chunks), "parts": parts})
                _pad(f)
                advance()
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()
    return entries


def _write_resident_safetensors(layout: Layout, path: Path) -> None:
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for t in layout.resident:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.length]}
        pos += t.length
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in layout.resident:
            f.write(_read(t.file, t.offset, t.length))
        os.fsync(f.fileno())


def _write_resident_gguf(layout: Layout, path: Path) -> None:
    """Resident tensors as stored (quantized or not) with every metadata field of the source (tokenizer included)."""
    import numpy as np

    source = str(Path(layout.path) / RESIDENT_FILES["gguf"]) if layout.format == "repacked" else layout.files[0]
    reader = gguf.GGUFReader(source, "r")
    w = gguf.GGUFWriter(path, layout.architecture)
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "split.")) or name == "general.architecture":
            continue
        kind = field.types[0]
        w.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in layout.resident:
        q = gguf.GGMLQuantizationType[t.dtype]
        w.add_tensor_info(t.name, gguf.quants.quant_shape_to_byte_shape(t.shape, q), np.dtype(np.uint8), t.length, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in layout.resident:
        w.write_tensor_data(np.frombuffer(_read(t.file, t.offset, t.length), dtype=np.uint8))
    w.flush()
    os.fsync(w.fout[0].fileno())
    w.close()


def repack(model_ref: str | Path, outdir: str | Path, files: str = "single", progress: bool = True,
           compact: bool = False, quantize: str | None = None) -> Path:
    """Write `model_ref` (safetensors, GGUF or repacked) as a repacked folder `outdir`; returns its path. With
    `compact` (a quantized GGUF) or `quantize` ("int4"/"int8", a float checkpoint), slices are stored transcoded
    to the compact tier, so page-in is one read and no transcode."""
    if files not in FILE_MODES:
        raise ExpertPagerError(f"unknown --files {files!r}; use one of {', '.join(FILE_MODES)}")
    layout = read_layout(model_ref)
    compact = compact or quantize is not None
    if compact and resolve_tier(layout, "compact", quantize) != "compact":
        raise ExpertPagerError(f"{layout.path}: --compact needs quantized experts without biases")
    out = Path(outdir)
    if out.exists():
        raise ExpertPagerError(f"{out}: already exists; repack writes a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        source = layout.weights_format
        if source == "gguf":
            _write_resident_gguf(layout, tmp / RESIDENT_FILES["gguf"])
        else:
            _write_resident_safetensors(layout, tmp / RESIDENT_FILES["safetensors"])
            for f in Path(layout.path).iterdir():
                if f.suffix in COPIED_SUFFIXES and f.name not in (MANIFEST, "model.safetensors.index.json"):
                    shutil.copyfile(f, tmp / f.name)
        manifest = {"format": MANIFEST_FORMAT, "source": str(layout.path), "source_format": source,
                    "architecture": layout.architecture, "num_layers": layout.num_layers, "moe_layers": layout.moe_layers,
                    "num_experts": layout.num_experts, "experts_per_token": layout.experts_per_token, "files": files,
                    "quantize": quantize,
                    "slices": _write_slices(layout, tmp, files, progress, compact, quantize == "int4")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
