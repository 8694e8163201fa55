"""An experts module that owns no expert weights: it pins the routed slices from the pager and computes exactly
what transformers' default `grouped_mm` experts forward computes, one expert group at a time."""

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from transformers.integrations.moe import _grouped_linear

from ..model.layout import ExpertSlice, SliceKey
from ..pager import Decoder
from .dequant import dequantize

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _weights(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A part's bytes as a tensor: a zero-copy view for float types, dequantized to float32 for GGML block types."""
    if dtype in TORCH_DTYPES:
        return torch.from_numpy(raw).view(TORCH_DTYPES[dtype]).view(shape)
    return dequantize(torch.from_numpy(raw), dtype, shape)


def decoded_slice(s: ExpertSlice, dtype: torch.dtype) -> ExpertSlice:
    """The slice as the dequantized tier holds it: every part in `dtype`, gate then up adjacent (so gate_up is one
    view), offsets within the slot."""
    first = [p for role in ("gate", "up") for p in s.parts if p.role == role]
    parts, pos = [], 0
    for p in first + [p for p in s.parts if p not in first]:
        n = math.prod(p.shape) * dtype.itemsize
        parts.append(replace(p, offset=pos, length=n, dtype=DTYPE_NAMES[dtype]))
        pos += n
    return replace(s, parts=tuple(parts))


def dequantizer(slices: Mapping[SliceKey, ExpertSlice], dtype: torch.dtype) -> tuple[Decoder, dict[SliceKey, ExpertSlice]]:
    """A pager decode step that dequantizes each part once at page-in to `dtype` (float32 first, then cast, exactly
    as slice_tensors does on every use of a raw slice), and the slices as the cache then serves them."""
    served = {k: decoded_slice(s, dtype) for k, s in slices.items()}

    def decode(key: SliceKey, raw: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        for p in slices[key].parts:
            torch.from_numpy(out[p.role]).view(dtype).view(p.shape).copy_(_weights(raw[p.role], p.dtype, p.shape))

    views = {k: tuple((p.role, p.offset, p.length) for p in s.parts) for k, s in served.items()}
    return Decoder(views, decode), served


def slice_tensors(s: ExpertSlice, views: dict[str, np.ndarray], dtype: torch.dtype,
                  transpose: bool = False) -> dict[str, torch.Tensor]:
    """Torch tensors over a pinned slice's bytes (zero-copy when the stored dtype is the compute dtype; quantized
    blocks of a raw-tier slice are dequantized here, on every use).

    gate and up are fused into gate_up as transformers does at load: one tensor over both when they are adjacent
    in the slot with the same type, else a concatenation. With `transpose` (a GGUF slice of gpt-oss, whose module
    multiplies by [in, out] weights) gate and up, and their biases, are interleaved into gate_up and gate_up_bias
    and the weights transposed back from llama.cpp's [out, in]: copies, on every use."""
    parts = {p.role: p for p in s.parts}
    out = {}
    if transpose:
        tensors = {role: _weights(views[role], p.dtype, p.shape) for role, p in parts.items()}
        for suffix in ("", "_bias"):
            if "gate" + suffix in tensors:
                gate, up = tensors.pop("gate" + suffix), tensors.pop("up" + suffix)
                tensors["gate_up" + suffix] = torch.stack([gate, up], dim=1).flatten(0, 1)
        return {k: (v.T if v.ndim == 2 else v).contiguous().to(dtype) for k, v in tensors.items()}
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
        self.dtype = torch.float32
        self.transpose = False  # set by the loader: slices in GGUF's order for a transposed module (see slice_tensors)
        self.chunk = 1  # slices pinned at once when a prefill hits many experts
        self.on_route = None  # optional callback(layer, expert_ids) -> slice keys to prefetch, before the first pin

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, paged"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, num_top_k = top_k_index.shape
        expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
        selected = hidden_states[perm // num_top_k].to(self.dtype)
        sample_weights_g = top_k_weights.reshape(-1)[perm]
        counts = torch.bincount(expert_ids_g, minlength=self.num_experts).tolist()
        hit = [e for e, c in enumerate(counts) if c]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        rows = {e: slice(starts[e], starts[e + 1]) for e in hit}
        chunks = [hit[i:i + self.chunk] for i in range(0, len(hit), self.chunk)]
        # Gating runs once over all rows, as in transformers: elementwise kernels may round differently on fewer rows.
        proj = None
        for i, chunk in enumerate(chunks):
            following = chunks[i + 1] if i + 1 < len(chunks) else []
            ahead = self.on_route(self.layer, hit) if i == 0 and self.on_route is not None else []
            with self.cache.pin_each(self._keys(chunk), self._keys(following) + list(ahead)) as stream:
                weights = {}
                for (_, e), buf in stream:  # each expert as soon as its slice is ready
                    weights[e] = self._tensors(e, buf)
                    up = self._project(selected[rows[e]], weights[e], "gate_up")
                    proj = up.new_empty(selected.shape[0], up.shape[-1]) if proj is None else proj
                    proj[rows[e]] = up
                if len(chunks) == 1:  # the usual case (always in decode): one pin for both projections
                    out = self._down(self._template._apply_gate(proj), chunk, weights, rows, None)
        if len(chunks) > 1:
            gated = self._template._apply_gate(proj)
            out = None
            for i, chunk in enumerate(reversed(chunks)):  # newest slices first: they are the ones still cached
                following = chunks[-i - 2] if i + 2 <= len(chunks) else []
                with self.cache.pin_many(self._keys(chunk), self._keys(following)) as pinned:
                    out = self._down(gated, chunk, {e: self._tensors(e, pinned[(self.layer, e)]) for e in chunk}, rows, out)
        weighted = out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0))
        return weighted[inv_perm].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _keys(self, experts: list[int]) -> list[SliceKey]:
        return [(self.layer, e) for e in experts]

    def _tensors(self, expert: int, buf) -> dict[str, torch.Tensor]:
        """The tensors of one pinned expert, built once per pin."""
        return slice_tensors(self.slices[expert], buf.views, self.dtype, self.transpose)

    def _down(self, gated: torch.Tensor, chunk: list[int], weights: dict, rows: dict, out: torch.Tensor | None) -> torch.Tensor:
        for e in chunk:
            down = self._project(gated[rows[e]], weights[e], "down")
            out = down.new_empty(gated.shape[0], down.shape[-1]) if out is None else out
            out[rows[e]] = down
        return out

    def _project(self, x: torch.Tensor, w: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        """x through one expert's gate_up or down matrix (plus bias), with transformers' grouped_mm kernel."""
        offs = torch.tensor([x.shape[0]], dtype=torch.int32)
        return _grouped_linear(x, w[which].unsqueeze(0), offs, bias=w.get(which + "_bias"), is_transposed=self.is_transposed)
