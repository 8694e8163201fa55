"""The compact expert tier: quantized GGUF slices held at about their stored size, in the layouts that torch's
weight-only CPU kernels multiply directly with bfloat16 activations, transcoded once at page-in. Where the CPU has
AVX2 or AVX-512 the same bytes are multiplied by the native kernels instead (runtime/native.py: activations quantized
to int8 per 32 values, near memory bandwidth); the notes on speed below are about torch's kernels.

- Q4_0, Q4_1 and Q4_K matrices become torch's packed int4 with one (scale, zero) pair per 32 weights: the same
  groups and 4-bit codes, so the only change is rounding each group's scale and zero to bfloat16
  (`_weight_int4pack_mm_for_cpu`, 0.625 bytes a weight against Q4_K's 0.5625).
- Every other type (Q5_*, Q6_K, Q8_0, F16, ...), and matrices whose shape the int4 kernel refuses (rows not a
  multiple of 16 or 32-weight groups), is requantized to int8 with one bfloat16 scale per output row
  (`_weight_int8pack_mm`, 1 byte a weight): the one lossy step for the weights beyond bfloat16 scales. The lm_head
  (a Q6_K output tensor: a quarter of a decode step's weight bytes) multiplies its int8 rows with activations
  quantized to int8 (`int8_matmul`, as llama.cpp's dot products do): 1.2-1.7x faster, at an error
  bench/compact.py measures.
- With `requantize` (`--quantize int4`) every type goes to int4 groups of 32 (round to nearest over each group's
  min..max): smaller and faster (a Q6_K lm_head multiplies about 1.9x faster as int4 than as int8 rows) at the
  cost of 4-bit error where the file kept 5, 6 or 8 bits; bench/compact.py measures it.
Paged output equals the same tier fully cached bit for bit; its difference from the float32 tier is measured in
bench/compact.py and README.md."""

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..model.layout import ExpertSlice, SliceKey, TensorPart
from ..pager import Decoder
from . import native
from .dequant import BLOCKS, QK_K, _f16, _k_scale_min, _nibbles, dequantize
from .matrices import ALIGN, MATRICES

GROUP = 32
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overloads themselves: no lookup per call
INT8_MM = torch.ops.aten._weight_int8pack_mm.default
INT_MM = torch.ops.aten._int_mm.default
INT8_ROWS = 64  # rows of activations per int32 product in int8_matmul
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_fields(raw: torch.Tensor, qtype: str, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K matrix of `rows` rows as (codes [rows, K] int32 in 0..15, scale [rows, K/32], zero
    [rows, K/32]) in float32, such that weight = (code - 8) * scale + zero for each group of 32. Any other type
    (`--quantize int4`) is dequantized and quantized to nearest over each group's min..max."""
    weights, size = BLOCKS[qtype]
    if qtype not in INT4_TYPES:
        w = dequantize(raw, qtype, (rows, raw.numel() // rows // size * weights)).reshape(rows, -1, GROUP)
        low = w.amin(-1)
        scale = ((w.amax(-1) - low) / 15).clamp(min=1e-12)
        codes = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).int()
        return codes.reshape(rows, -1), scale, low + 8 * scale
    b = raw.reshape(-1, size)
    if qtype == "Q4_0":
        scale = _f16(b[:, :2])
        return _nibbles(b[:, 2:], 16).reshape(rows, -1).int(), scale.reshape(rows, -1), torch.zeros_like(scale).reshape(rows, -1)
    if qtype == "Q4_1":
        scale, low = _f16(b[:, :2]), _f16(b[:, 2:4])
        return _nibbles(b[:, 4:], 16).reshape(rows, -1).int(), scale.reshape(rows, -1), (8 * scale + low).reshape(rows, -1)
    sc, mn = _k_scale_min(b[:, 4:16])  # Q4_K: weight = d * sc * q - dmin * mn, per group of 32
    scale = _f16(b[:, :2]) * sc.float()
    low = _f16(b[:, 2:4]) * mn.float()
    codes = _nibbles(b[:, 16:], 32).reshape(-1, QK_K // 32, 32)
    return codes.reshape(rows, -1).int(), scale.reshape(rows, -1), (8 * scale - low).reshape(rows, -1)


def _int4_ok(parts: list[TensorPart], requantize: bool) -> bool:
    rows = sum(p.shape[0] for p in parts)
    return all(packs_as_int4(p.dtype, (rows, *p.shape[1:]), requantize) for p in parts)


def compact_parts(s: ExpertSlice, requantize: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """The served parts of a compact slice: (role, dtype, shape) of each packed matrix and its scales.
    `requantize`: matrices of every type go to int4 (`--quantize int4`), else only 4-bit types do."""
    roles = {p.role: p for p in s.parts}
    out = []
    for matrix, names in MATRICES.items():
        parts = [roles[r] for r in names if r in roles]
        rows, cols = sum(p.shape[0] for p in parts), parts[0].shape[-1]
        if _int4_ok(parts, requantize):
            out += [(matrix, "U8", (rows, cols // 2)), (matrix + "_sz", "BF16", (cols // GROUP, rows, 2))]
        else:
            out += [(matrix, "I8", (rows, cols)), (matrix + "_scale", "BF16", (rows,))]
    return out


def compactor(slices: Mapping[SliceKey, ExpertSlice], requantize: bool = False) -> tuple[Decoder, dict[SliceKey, ExpertSlice]]:
    """A pager decode step that transcodes each slice to the compact layout, and the slices as the cache serves them
    (parts at aligned slot offsets; dtype U8 packed int4, I8 int8 rows, BF16 scales). Slices with biases (gpt-oss)
    are not supported: they keep the dequantized tier."""
    served = {}
    for key, s in slices.items():
        parts, pos = [], 0
        for role, dtype, shape in compact_parts(s, requantize):
            pos += -pos % ALIGN
            n = math.prod(shape) * (2 if dtype == "BF16" else 1)
            parts.append(TensorPart(role, "", pos, n, dtype, shape))
            pos += n
        served[key] = ExpertSlice(s.layer, s.expert, tuple(parts))

    def decode(key: SliceKey, raw: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        roles = {p.role: p for p in slices[key].parts}
        for role, tensor in transcode(roles, {r: torch.from_numpy(v) for r, v in raw.items()}, requantize).items():
            target = torch.from_numpy(out[role])
            target.copy_(tensor.reshape(-1).view(torch.uint8))

    views = {k: tuple((p.role, p.offset, p.length) for p in s.parts) for k, s in served.items()}
    return Decoder(views, decode), served


def transcode(roles: Mapping[str, TensorPart], raw: Mapping[str, torch.Tensor], requantize: bool = False) -> dict[str, torch.Tensor]:
    """The compact tensors of one slice from its stored bytes (uint8 tensors by role); `requantize` as in compact_parts."""
    out = {}
    for matrix, names in MATRICES.items():
        parts = [roles[r] for r in names if r in roles]
        packed = pack_matrix([(raw[p.role], p.dtype, p.shape) for p in parts], _int4_ok(parts, requantize))
        out.update({matrix + suffix: t for suffix, t in packed.items()})
    return out


def pack_matrix(parts: list[tuple[torch.Tensor, str, tuple[int, ...]]], int4: bool, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """One [rows, cols] matrix, stacked from `parts` (stored bytes, GGML type, numpy-order shape), as compact tensors
    keyed by suffix: "" the int4-packed or int8 weights, "_sz" or "_scale" their bfloat16 scales. Large parts go
    `chunk` rows at a time (a multiple of 64: torch's int4 packing is row-independent in blocks of 64), so a
    vocabulary-sized matrix never exists in float32 at once."""
    if len(parts) > 1:  # an expert's gate and up: small; stacked before packing, which spans row blocks of 64
        fields = [int4_fields(raw, qtype, shape[0]) if int4 else dequantize(raw, qtype, shape) for raw, qtype, shape in parts]
        return _pack([torch.cat(f) for f in zip(*fields)] if int4 else torch.cat(fields), int4)
    (raw, qtype, shape), = parts
    rows = shape[0]
    chunks = []
    for r in range(0, rows, chunk):
        n = min(chunk, rows - r)
        piece = raw.reshape(rows, -1)[r:r + n].reshape(-1)
        chunks.append(_pack(int4_fields(piece, qtype, n) if int4 else dequantize(piece, qtype, (n, *shape[1:])), int4))
    if int4:
        return {"": torch.cat([c[""] for c in chunks]), "_sz": torch.cat([c["_sz"] for c in chunks], dim=1).contiguous()}
    return {"": torch.cat([c[""] for c in chunks]), "_scale": torch.cat([c["_scale"] for c in chunks])}


def _pack(values, int4: bool) -> dict[str, torch.Tensor]:
    """int4: (codes, scale, zero) from int4_fields, packed; else float weights [rows, cols] as int8 rows."""
    if int4:
        codes, scale, zero = values
        return {"": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                "_sz": torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()}
    scale = values.abs().amax(dim=1).clamp(min=1e-30) / 127
    return {"": torch.round(values / scale[:, None]).clamp(-127, 127).to(torch.int8), "_scale": scale.to(torch.bfloat16)}


def packs_as_int4(qtype: str, shape: tuple[int, ...], requantize: bool = False) -> bool:
    """Whether a [rows, cols] matrix of `qtype` goes to int4 (else int8 rows); `requantize`: every type does."""
    return (qtype in INT4_TYPES or requantize) and shape[0] % 16 == 0 and shape[-1] % GROUP == 0


def compact_bytes(qtype: str, shape: tuple[int, ...], requantize: bool = False) -> int:
    """Bytes a [rows, cols] matrix of `qtype` takes once packed (`requantize` as in packs_as_int4)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if packs_as_int4(qtype, shape, requantize):
        return rows * cols // 2 + cols // GROUP * rows * 4
    return rows * cols + rows * 2


def compact_tensors(s: ExpertSlice, views: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a pinned compact slice."""
    dtypes = {"U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16}
    return {p.role: torch.from_numpy(views[p.role]).view(dtypes[p.dtype]).view(p.shape) for p in s.parts}


def is_compact(s: ExpertSlice) -> bool:
    return any(p.role.endswith(("_sz", "_scale")) for p in s.parts)


def compact_project(x: torch.Tensor, w: Mapping[str, torch.Tensor], which: str,
                    int8_activations: bool = False) -> torch.Tensor:
    """x [rows, in] (bfloat16) through one compact matrix (`int8_activations` as in compact_matmul)."""
    return compact_matmul(w, which, int8_activations)(x)


def compact_matmul(w: Mapping[str, torch.Tensor], which: str,
                   int8_activations: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [rows, in] (bfloat16) -> x through the compact matrix `which` of `w`, its tensors looked up once: the
    native kernels (int8 activations in groups of 32, runtime/native.py) where they run and take the shape, else
    torch's weight-only kernels with bfloat16 activations, or for an int8 matrix with `int8_activations` int8 ones
    (int8_matmul)."""
    if which + "_sz" in w:
        weight, scale_zero = w[which], w[which + "_sz"]
        if native.q4_fits(weight):
            return native.q4_kernel(weight, scale_zero)
        return lambda x: INT4_MM(x, weight, GROUP, scale_zero)
    weight, scale = w[which], w[which + "_scale"]
    if native.q8_fits(weight):
        return native.q8_kernel(weight, scale)
    if int8_activations:
        weight_t = weight.T
        return lambda x: int8_matmul(x, weight_t, scale)
    return lambda x: INT8_MM(x, weight, scale)


def int8_matmul(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] through int8 weight rows (`weight_t` [in, out], the transposed view of [out, in], and their
    `scale` [out]) with x quantized to int8 as llama.cpp quantizes activations for its 8-bit dot products, but one
    scale per row (its largest magnitude / 127): an int32 product (`torch._int_mm`, oneDNN's integer GEMM, VNNI
    where the CPU has it), then both scales in float32. For a vocabulary-sized lm_head 1.2-1.7x faster than
    `_weight_int8pack_mm` (which widens every weight to float32); its error is measured in bench/compact.py.
    More than INT8_ROWS rows go INT8_ROWS at a time (each row's result is independent of the others), so the int32
    and float32 products of a vocabulary-sized output (10 bytes a logit) exist for one group of rows at a time."""
    if x.shape[0] > INT8_ROWS:
        out = torch.empty(x.shape[0], weight_t.shape[1], dtype=torch.bfloat16)
        for r in range(0, x.shape[0], INT8_ROWS):
            out[r:r + INT8_ROWS] = int8_matmul(x[r:r + INT8_ROWS], weight_t, scale)
        return out
    xf = x.float()
    step = xf.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / 127
    codes = xf.div_(step).round_().to(torch.int8)
    return torch.mul(INT_MM(codes, weight_t), step * scale).to(torch.bfloat16)
