"""An experts module that owns no expert weights: it pins the routed slices from the pager and computes exactly
what transformers' default `grouped_mm` experts forward computes, one expert group at a time.

Exactness across CPUs: torch's CPU grouped_mm runs one `mm_out` per expert into that expert's rows of one output,
and a GEMM kernel may take another code path (and round differently) when a matrix sits at another address modulo
a cache line. So each expert's rows are written into an output laid out as grouped_mm lays it out, and each weight
is served at the address, modulo ALIGN, that the fully resident model holds it at (`resident_offsets`)."""

import ctypes
import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from transformers.integrations.moe import _can_use_grouped_mm

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, SliceKey
from ..pager import Decoder, plan_reads
from .compact import compact_matmul, compact_project, compact_tensors, is_compact
from .dequant import dequantize
from .lora import merged_weight
from .matrices import ALIGN, MATRICES, at_offset, matrix_of

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _weights(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A part's bytes as a tensor: a zero-copy view for float types, dequantized to float32 for GGML block types."""
    if dtype in TORCH_DTYPES:
        return torch.from_numpy(raw).view(TORCH_DTYPES[dtype]).view(shape)
    return dequantize(torch.from_numpy(raw), dtype, shape)


def resident_offsets(s: ExpertSlice, dtype: torch.dtype, in_place: bool) -> dict[str, int]:
    """Where the fully resident transformers model holds this expert's gate_up and down weights, modulo ALIGN.
    transformers stacks per-expert tensors (or casts) into a fresh, aligned [E, ...] parameter, so expert e starts
    e matrices in; a stacked tensor of a safetensors file, already in the compute dtype, it uses in place
    (`in_place`), at the file's offset (the file is mapped at a page boundary)."""
    roles = {p.role: p for p in s.parts}
    out = {}
    for matrix, names in MATRICES.items():
        parts = [roles[r] for r in names if r in roles]
        if not parts:
            continue
        if in_place and parts[0].stacked and parts[0].dtype == DTYPE_NAMES.get(dtype):
            out[matrix] = parts[0].offset % ALIGN
        else:
            out[matrix] = s.expert * sum(math.prod(p.shape) for p in parts) * dtype.itemsize % ALIGN
    return out


def stored_offsets(s: ExpertSlice) -> dict[str, int]:
    """Where a slot that holds the stored bytes puts each matrix, modulo ALIGN (a slot keeps file offsets modulo a
    block; gate and up are one matrix only when adjacent in the file)."""
    roles = {p.role: p for p in s.parts}
    out = {m: roles[names[0]].offset % ALIGN for m, names in MATRICES.items() if names[0] in roles}
    if "gate" in roles and roles["up"].offset != roles["gate"].offset + roles["gate"].length:
        out["gate_up"] = -1  # served as a concatenation: a fresh copy
    return out


def decoded_slice(s: ExpertSlice, dtype: torch.dtype, offsets: Mapping[str, int]) -> ExpertSlice:
    """The slice as a decoding tier holds it: every part in `dtype`, gate then up adjacent (so gate_up is one
    view), each matrix at its resident address modulo ALIGN (`offsets`, from resident_offsets), offsets within
    the slot."""
    first = [p for role in ("gate", "up") for p in s.parts if p.role == role]
    parts, pos = [], 0
    for p in first + [p for p in s.parts if p not in first]:
        matrix = matrix_of(p.role)
        if matrix is not None and p.role != "up":
            pos += (offsets[matrix] - pos) % ALIGN
        n = math.prod(p.shape) * dtype.itemsize
        parts.append(replace(p, offset=pos, length=n, dtype=DTYPE_NAMES[dtype]))
        pos += n
    return replace(s, parts=tuple(parts))


def transposed_slice(s: ExpertSlice) -> ExpertSlice:
    """A GGUF gpt-oss slice (llama.cpp's separate gate and up, [out, in]) described as transformers holds it: gate_up
    [in, 2 * out] with gate and up columns interleaved, gate_up_bias likewise, down [in, out]; offsets not yet placed
    (see decoded_slice)."""
    parts = {p.role: p for p in s.parts}
    out = []
    for role, p in parts.items():
        if role.startswith("up"):
            continue
        shape = p.shape[::-1]
        if role.startswith("gate"):
            role, shape = role.replace("gate", "gate_up"), (*shape[:-1], 2 * shape[-1])
        out.append(replace(p, role=role, shape=tuple(shape)))
    return replace(s, parts=tuple(out))


def hf_tensors(s: ExpertSlice, views: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A GGUF gpt-oss slice's tensors as transformers' module multiplies them (see transposed_slice): gate and up,
    and their biases, interleaved into gate_up and gate_up_bias, weights transposed back to [in, out]; strided
    views or fresh tensors in the stored dtype, or float32 for quantized blocks."""
    tensors = {p.role: _weights(views[p.role], p.dtype, p.shape) for p in s.parts}
    for suffix in ("", "_bias"):
        if "gate" + suffix in tensors:
            gate, up = tensors.pop("gate" + suffix), tensors.pop("up" + suffix)
            tensors["gate_up" + suffix] = torch.stack([gate, up], dim=1).flatten(0, 1)
    return {k: v.T if v.ndim == 2 else v for k, v in tensors.items()}


def dequantizer(slices: Mapping[SliceKey, ExpertSlice], dtype: torch.dtype,
                offsets: Mapping[SliceKey, Mapping[str, int]],
                transpose: bool = False) -> tuple[Decoder, dict[SliceKey, ExpertSlice]]:
    """A pager decode step that writes each part once at page-in in `dtype` at its resident alignment (quantized
    blocks dequantized to float32 first, then cast, exactly as slice_tensors does on every use of a raw slice), and
    the slices as the cache then serves them. With `transpose` (a GGUF slice of gpt-oss) the slot holds gate_up
    interleaved and the weights transposed as transformers holds them (hf_tensors), so a hit needs no copy."""
    served = {k: decoded_slice(transposed_slice(s) if transpose else s, dtype, offsets[k]) for k, s in slices.items()}

    def decode(key: SliceKey, raw: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        s = slices[key]
        tensors = hf_tensors(s, raw) if transpose else {p.role: _weights(raw[p.role], p.dtype, p.shape) for p in s.parts}
        for role, t in tensors.items():
            torch.from_numpy(out[role]).view(dtype).view(t.shape).copy_(t)

    views = {k: tuple((p.role, p.offset, p.length) for p in s.parts) for k, s in served.items()}
    return Decoder(views, decode), served


def realigner(slices: Mapping[SliceKey, ExpertSlice],
              offsets: Mapping[SliceKey, Mapping[str, int]]) -> tuple[Decoder, dict[SliceKey, ExpertSlice]]:
    """An in-place pager decode step for slices stored in the compute dtype: each part moves up its slot, by less
    than ALIGN bytes per part, so each weight matrix sits at its resident alignment (`offsets`); gate and up stay
    adjacent. Returns the decoder and the slices as the cache then serves them."""
    moves, served = {}, {}
    for key, s in slices.items():
        read = {role: off for role, off, _ in plan_reads(s).views}
        units: list[list] = []  # [slot offset, parts]: parts that move together
        for p in sorted(s.parts, key=lambda p: read[p.role]):
            if p.role == "up" and units and units[-1][1][-1].role == "gate" and read["up"] == units[-1][0] + units[-1][1][-1].length:
                units[-1][1].append(p)
            else:
                units.append([read[p.role], [p]])
        placed, end = [], 0
        for start, parts in units:
            matrix = matrix_of(parts[0].role)
            pos = max(start, end)
            if matrix is not None:
                pos += (offsets[key][matrix] - pos) % ALIGN
            placed.append((start, pos, parts))
            end = pos + sum(p.length for p in parts)
        moves[key] = placed
        served[key] = replace(s, parts=tuple(replace(p, offset=pos + sum(q.length for q in parts[:i]))
                                             for _, pos, parts in placed for i, p in enumerate(parts)))

    def decode(key: SliceKey, raw: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        for _, _, parts in reversed(moves[key]):  # the last first: a part only moves up, never onto one not yet moved
            n = sum(p.length for p in parts)
            ctypes.memmove(out[parts[0].role].ctypes.data, raw[parts[0].role].ctypes.data, n)

    views = {k: tuple((p.role, p.offset, p.length) for p in s.parts) for k, s in served.items()}
    return Decoder(views, decode, in_place=True), served


def slice_tensors(s: ExpertSlice, views: dict[str, np.ndarray], dtype: torch.dtype,
                  transpose: bool = False) -> dict[str, torch.Tensor]:
    """Torch tensors over a pinned slice's bytes (zero-copy when the stored dtype is the compute dtype; quantized
    blocks of a raw-tier slice are dequantized here, on every use).

    gate and up are fused into gate_up as transformers does at load: one tensor over both when they are adjacent
    in the slot with the same type, else a concatenation. With `transpose` (a GGUF slice of gpt-oss, whose module
    multiplies by [in, out] weights) gate and up, and their biases, are interleaved into gate_up and gate_up_bias
    and the weights transposed back from llama.cpp's [out, in] (hf_tensors): copies, on every use of a raw-tier
    slice (the other tiers hold them so from page-in)."""
    if transpose:
        return {k: v.contiguous().to(dtype) for k, v in hf_tensors(s, views).items()}
    parts = {p.role: p for p in s.parts}
    out = {}
    if "gate" in parts:
        gate, up = parts.pop("gate"), parts.pop("up")
        a, b = views["gate"], views["up"]
        if b.ctypes.data == a.ctypes.data + a.nbytes and gate.dtype == up.dtype:
            both = np.lib.stride_tricks.as_strided(a, shape=(a.nbytes + b.nbytes,), strides=(1,))
            out["gate_up"] = _weights(both, gate.dtype, (gate.shape[0] + up.shape[0], *gate.shape[1:]))
        else:
            out["gate_up"] = torch.cat([_weights(a, gate.dtype, gate.shape), _weights(b, up.dtype, up.shape)])
    for role, p in parts.items():
        out[role] = _weights(views[role], p.dtype, p.shape)
    return {k: v if v.dtype == dtype else v.to(dtype) for k, v in out.items()}


class PagedExperts(nn.Module):
    """Drop-in for a transformers `*Experts` module: forward(hidden_states[T,H], top_k_index[T,k], top_k_weights[T,k])."""

    def __init__(self, template: nn.Module, layer: int):
        super().__init__()
        self.layer = layer
        self.num_experts = template.num_experts
        self.is_transposed = getattr(template, "is_transposed", False)
        self.has_bias = getattr(template, "has_bias", False)
        for name in list(template._parameters):  # the template keeps only its gating function and flags
            del template._parameters[name]
        object.__setattr__(self, "_template", template)
        self.cache = None  # set by the loader: a pager SliceCache
        self.slices: dict[int, ExpertSlice] = {}
        self.offsets: dict[int, dict[str, int]] = {}  # set by the loader: resident_offsets of each expert
        self.dtype = torch.float32
        self.transpose = False  # set by the loader: slices in GGUF's order for a transposed module (see slice_tensors)
        self.chunk = 1  # slices pinned at once when a prefill hits many experts
        self.on_route = None  # optional callback(layer, expert_ids) -> slice keys to prefetch, before the first pin
        self.on_output = None  # optional callback(layer, expert_ids[R], weights[R], outputs[R, H]): every routed
        # (token, expert) row's unweighted expert output, rows sorted by expert (the pruning statistics read them)
        self.adapters = None  # set by the loader when it loads adapters: runtime.adapters.Adapters
        self.compact = False  # set by the loader: slices in the compact tier (decode takes _decode_compact)
        self._matmuls: dict[SliceKey, tuple] = {}  # see _compact_matmuls

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, paged"

    @torch.no_grad()  # inference only: the matmuls write into preallocated outputs, which autograd does not allow
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, num_top_k = top_k_index.shape
        if num_tokens == 1 and self.compact and self.adapters is None and self.on_output is None:
            return self._decode_compact(hidden_states, top_k_index[0], top_k_weights[0])
        expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
        selected = hidden_states[perm // num_top_k].to(self.dtype)
        sample_weights_g = top_k_weights.reshape(-1)[perm]
        counts = torch.bincount(expert_ids_g, minlength=self.num_experts).tolist()
        hit = [e for e, c in enumerate(counts) if c]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        rows = {e: slice(starts[e], starts[e + 1]) for e in hit}
        chunks = [hit[i:i + self.chunk] for i in range(0, len(hit), self.chunk)]
        lora = self.adapters.expert_lora(self.layer) if self.adapters is not None else {}
        piece = self.adapters.active if lora else None  # the adapter whose pieces pin beside the slices
        # Gating runs once over all rows, as in transformers: elementwise kernels may round differently on fewer rows.
        proj = out = None
        for i, chunk in enumerate(chunks):
            following = chunks[i + 1] if i + 1 < len(chunks) else []
            ahead = self.on_route(self.layer, hit) if i == 0 and self.on_route is not None else []
            if ahead and self.adapters is not None:
                ahead = self.adapters.with_pieces(ahead)
            with self.cache.pin_each(self._keys(chunk, piece), self._keys(following, piece) + list(ahead)) as stream:
                weights, got = {}, {}
                for key, buf in stream:  # each expert as soon as its slice (and adapter piece) is ready
                    got[key] = buf
                    e = key[1]
                    if all(k in got for k in self._keys([e], piece)):
                        weights[e] = self._tensors(e, got, piece, lora)
                        proj = self._project(selected, rows[e], weights[e], "gate_up", proj)
                if len(chunks) == 1:  # the usual case (always in decode): one pin for both projections
                    gated = self._template._apply_gate(proj)
                    for e in chunk:
                        out = self._project(gated, rows[e], weights[e], "down", out)
        if len(chunks) > 1:
            gated = self._template._apply_gate(proj)
            for i, chunk in enumerate(reversed(chunks)):  # newest slices first: they are the ones still cached
                following = chunks[-i - 2] if i + 2 <= len(chunks) else []
                with self.cache.pin_many(self._keys(chunk, piece), self._keys(following, piece)) as pinned:
                    for e in chunk:
                        out = self._project(gated, rows[e], self._tensors(e, pinned, piece, lora), "down", out)
        if self.on_output is not None:
            self.on_output(self.layer, expert_ids_g, sample_weights_g, out)
        weighted = out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0))
        return weighted[inv_perm].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _decode_compact(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token through its k experts in the compact tier (the decode step): each expert's gate_up computed as
        soon as its slice is ready, then the gating once over the k rows (in expert order) and each down
        projection, the outputs summed weighted in top-k order, so the result does not depend on which slices were
        cached (fewer small ops than the grouped path, same numbers whether paged or fully cached)."""
        ids = index.tolist()
        hit = sorted(set(ids))
        ahead = self.on_route(self.layer, hit) if self.on_route is not None else []
        xb = x.to(torch.bfloat16)
        projected, downs = {}, {}
        with self.cache.pin_each(self._keys(hit), ahead) as stream:
            for key, buf in stream:
                gate_up, downs[key[1]] = self._compact_matmuls(key, buf)
                projected[key[1]] = gate_up(xb)
            gated = self._template._apply_gate(torch.cat([projected[e] for e in hit]))
            outs = {e: downs[e](gated[i:i + 1]) for i, e in enumerate(hit)}
        return torch.mm(weights.to(torch.bfloat16).unsqueeze(0), torch.cat([outs[e] for e in ids])).to(x.dtype)

    def _compact_matmuls(self, key: SliceKey, buf) -> tuple[Callable, Callable]:
        """The gate_up and down matmuls over a pinned compact slice, kept while the slice stays loaded (a slot
        reloaded gets a new buffer, so its matmuls are rebuilt)."""
        known = self._matmuls.get(key)
        if known is None or known[0] is not buf:
            w = compact_tensors(self.slices[key[1]], buf.views)
            known = self._matmuls[key] = (buf, compact_matmul(w, "gate_up"), compact_matmul(w, "down"))
        return known[1], known[2]

    def _keys(self, experts: list[int], piece: str | None = None) -> list[tuple]:
        """The slice keys of `experts`, then the adapter `piece`'s keys for them (slices claim slots first)."""
        keys = [(self.layer, e) for e in experts]
        return keys + [(self.layer, e, piece) for e in experts] if piece is not None else keys

    def _tensors(self, expert: int, bufs: dict, piece: str | None = None, lora: dict | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one pinned expert, built once per pin, each weight at its resident address modulo ALIGN;
        with an adapter `piece`, each matrix in `lora` merged with its factors as peft merges them (runtime/lora.py)."""
        views = bufs[(self.layer, expert)].views
        if is_compact(self.slices[expert]):
            return compact_tensors(self.slices[expert], views)
        tensors = slice_tensors(self.slices[expert], views, self.dtype, self.transpose)
        offsets = self.offsets.get(expert, {})
        if piece is not None:
            factors = self.adapters.pieces[(self.layer, expert, piece)]
            pinned = bufs[(self.layer, expert, piece)].views
            for matrix, m in lora.items():
                a, b = (_weights(pinned[p.role], p.dtype, p.shape) for p in factors.parts if p.role.startswith(matrix + "."))
                w = tensors[matrix]
                fresh = expert * w.numel() * w.itemsize % ALIGN  # peft merges into a new [E, ...] tensor
                try:
                    tensors[matrix] = merged_weight(w, a, b, m.scaling, self.is_transposed, fresh)
                except RuntimeError as e:
                    raise ExpertPagerError(f"adapter {piece!r}: its LoRA on layer {self.layer}'s {matrix} does not fit the "
                                           f"model's {list(w.shape)} weights ({e})") from None
        for matrix, offset in offsets.items():
            if piece is None or matrix not in lora:
                tensors[matrix] = at_offset(tensors[matrix], offset)
        return tensors

    def _project(self, x: torch.Tensor, rows: slice, w: dict[str, torch.Tensor], which: str,
                 out: torch.Tensor | None) -> torch.Tensor:
        """Rows `rows` of x through one expert's gate_up or down matrix (plus bias), written into those rows of
        `out` (allocated on first use, over all of x's rows) as torch's grouped_mm writes each group."""
        if w[which].dtype in (torch.uint8, torch.int8):  # the compact tier
            y = compact_project(x[rows], w, which)
            out = x.new_empty(x.shape[0], y.shape[1]) if out is None else out
            out[rows] = y
            return out
        weight = w[which] if self.is_transposed else w[which].transpose(-2, -1)
        if out is None:
            out = grouped_output(x, weight)
        torch.mm(x[rows], weight, out=out[rows])
        if which + "_bias" in w:
            out[rows].add_(w[which + "_bias"])
        return out


def grouped_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output grouped_mm would multiply `x` [S, in] into, for [in, out] weights: torch's CPU kernel pads rows
    to 16 bytes; transformers' own fallback (where torch's kernel cannot be used) starts from zeros."""
    n = weight.shape[-1]
    if not _can_use_grouped_mm(x, weight.unsqueeze(0), torch.tensor([x.shape[0]], dtype=torch.int32)):
        return torch.zeros(x.shape[0], n, dtype=x.dtype)
    per_16 = 16 // x.itemsize
    return torch.empty_strided((x.shape[0], n), (-(-n // per_16) * per_16, 1), dtype=x.dtype)
