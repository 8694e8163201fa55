"""How llama.cpp stores the hybrid models' (Qwen3-Next, Qwen3.5-MoE: Gated DeltaNet layers between full-attention
ones) tensors that it transforms, and the exact inverse. As convert_hf_to_gguf.py's Qwen3NextModel and
_LinearAttentionVReorderBase write them:

- A_log as `ssm_a` = -exp(A_log); dt_bias as `ssm_dt.bias`; conv1d's [C, 1, K] weight squeezed to [C, K];
- every RMSNorm that computes x * (1 + weight) (all but the gated `linear_attn.norm`) as weight + 1;
- Qwen3-Next ("qkvz"): in_proj_qkvz, whose rows are [q, k, v, z] per key head, as `attn_qkv` (all q, all k, all v)
  and `attn_gate` (all z); in_proj_ba as it is;
- Qwen3.5 ("tiled_v"), where value heads outnumber key heads: value heads reordered from grouped by key head to
  tiled, in the rows of in_proj_qkv's v part, in_proj_z, in_proj_a/b, A_log, dt_bias and conv1d's v channels and
  in out_proj's columns.

Each transform is a permutation or one float32 operation whose inverse the model computes back exactly: norms are
read as stored - 1 (the model's 1 + (g - 1) is g again), and A_log as the float whose exp is exactly -ssm_a (the
log, nudged by an ulp or two where rounding moved it).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..model.architectures import Arch

Forward = Callable[[torch.Tensor], torch.Tensor]
Inverse = Callable[[list[torch.Tensor], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Heads:
    """The linear-attention geometry: key heads, value heads and their widths."""

    keys: int
    values: int
    key_dim: int
    value_dim: int

    @classmethod
    def of(cls, config: Mapping) -> "Heads":
        return cls(config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_key_head_dim"],
                   config["linear_value_head_dim"])


def _retile(t: torch.Tensor, dim: int, outer: int, inner: int, width: int) -> torch.Tensor:
    """Along `dim`, groups of `width` in [outer, inner] order swapped to [inner, outer] order. With (keys, values
    per key) it is llama.cpp's grouped-to-tiled value head order; with the two swapped, its inverse."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], outer, inner, width, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _value_rows(t: torch.Tensor, start: int, h: Heads, width: int, inverse: bool) -> torch.Tensor:
    """Rows from `start` on (the value heads' part) retiled, or restored with `inverse`."""
    per_key = h.values // h.keys
    outer, inner = (per_key, h.keys) if inverse else (h.keys, per_key)
    return torch.cat([t[:start], _retile(t[start:], 0, outer, inner, width)])


def _reorders(h: Heads, leaf: str) -> Callable[[torch.Tensor, bool], torch.Tensor] | None:
    """Qwen3.5's value head reordering of linear-attention tensor `leaf` (forward, or inverse), None if it has none."""
    qk = 2 * h.keys * h.key_dim
    per_key = h.values // h.keys
    rows = {"in_proj_qkv.weight": (qk, h.value_dim), "conv1d.weight": (qk, h.value_dim),
            "in_proj_z.weight": (0, h.value_dim), "in_proj_a.weight": (0, 1), "in_proj_b.weight": (0, 1),
            "A_log": (0, 1), "dt_bias": (0, 1)}
    if leaf in rows:
        start, width = rows[leaf]
        return lambda t, inverse: _value_rows(t, start, h, width, inverse)
    if leaf == "out_proj.weight":
        return lambda t, inverse: _retile(t, 1, *((per_key, h.keys) if inverse else (h.keys, per_key)), h.value_dim)
    return None


def _split_qkvz(t: torch.Tensor, h: Heads) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's in_proj_qkvz rows ([q, k, v, z] per key head) as (all q, all k, all v) and all z."""
    v = h.values // h.keys * h.value_dim
    q, k, vv, z = t.reshape(h.keys, -1, t.shape[-1]).split([h.key_dim, h.key_dim, v, v], dim=1)
    flat = lambda x: x.reshape(-1, t.shape[-1])  # noqa: E731
    return torch.cat([flat(q), flat(k), flat(vv)]), flat(z)


def _join_qkvz(qkv: torch.Tensor, z: torch.Tensor, h: Heads) -> torch.Tensor:
    """The inverse of _split_qkvz."""
    width = qkv.shape[-1]
    q, k, v = qkv.split([h.keys * h.key_dim, h.keys * h.key_dim, qkv.shape[0] - 2 * h.keys * h.key_dim])
    per_head = [x.reshape(h.keys, -1, width) for x in (q, k, v, z)]
    return torch.cat(per_head, dim=1).reshape(-1, width)


def log_of_neg(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A_log in `dtype` from ssm_a = -exp(A_log): log(-ssm_a), moved by up to 3 ulps to the value whose float32
    exp (as the model computes it, over the whole tensor) is exactly -ssm_a, where one exists."""
    target = -stored.float()
    best = target.log().to(dtype)
    bits = torch.int32 if dtype.itemsize == 4 else torch.int16
    base = best.view(bits)
    for step in (1, -1, 2, -2, 3, -3):
        candidate = (base + step).view(dtype)
        hit = (candidate.float().exp() == target) & (best.float().exp() != target)
        best = torch.where(hit, candidate, best)
    return best


def _named(names, hf_name: str, suffix: str = ".weight") -> str:
    """The GGUF name of a `<module>.weight` parameter (gguf-py's map knows modules, not parameters)."""
    return names.get_name(hf_name.removesuffix(".weight")) + suffix


def _plus_one(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight")


def to_gguf(arch: Arch, h: Heads, names, hf_name: str) -> list[tuple[str, Forward]] | None:
    """The GGUF tensors llama.cpp writes for the HF tensor `hf_name` (a name under `model.`), each with the function
    from its float32 values to the stored ones; None where the plain name mapping applies."""
    if not arch.hybrid:
        return None
    leaf = hf_name.split("linear_attn.")[-1] if "linear_attn." in hf_name else ""
    reorder = _reorders(h, leaf) if arch.hybrid == "tiled_v" and h.keys != h.values else None
    tiled = (lambda t: reorder(t, False)) if reorder else (lambda t: t)
    if leaf == "in_proj_qkvz.weight":
        base = hf_name.removesuffix("in_proj_qkvz.weight")
        return [(_named(names, base + "in_proj_qkv.weight"), lambda t: _split_qkvz(t, h)[0]),
                (_named(names, base + "in_proj_z.weight"), lambda t: _split_qkvz(t, h)[1])]
    if leaf == "A_log":  # a bare parameter: llama.cpp's name has no suffix
        return [(names.get_name(hf_name), lambda t: -torch.exp(tiled(t)))]
    if leaf == "dt_bias":
        return [(_named(names, hf_name.replace("dt_bias", "dt_proj"), ".bias"), tiled)]
    if leaf == "conv1d.weight":
        return [(_named(names, hf_name), lambda t: tiled(t.reshape(t.shape[0], -1)))]
    if _plus_one(hf_name):
        return [(_named(names, hf_name), lambda t: t + 1)]
    if reorder:
        return [(_named(names, hf_name), tiled)]
    return None


def from_gguf(arch: Arch, h: Heads, names, hf_name: str) -> tuple[list[str], Inverse] | None:
    """The GGUF tensors the HF parameter `hf_name` is read from, and the function from their float32 values (and
    the parameter's dtype) to its value; None where the plain name mapping applies."""
    forward = to_gguf(arch, h, names, hf_name)
    if forward is None:
        return None
    gguf_names = [name for name, _ in forward]
    leaf = hf_name.split("linear_attn.")[-1] if "linear_attn." in hf_name else ""
    reorder = _reorders(h, leaf) if arch.hybrid == "tiled_v" and h.keys != h.values else None
    untile = (lambda t: reorder(t, True)) if reorder else (lambda t: t)
    if leaf == "in_proj_qkvz.weight":
        return gguf_names, lambda ts, dtype: _join_qkvz(ts[0], ts[1], h)
    if leaf == "A_log":
        return gguf_names, lambda ts, dtype: log_of_neg(untile(ts[0]), dtype)
    if _plus_one(hf_name):
        return gguf_names, lambda ts, dtype: ts[0] - 1
    return gguf_names, lambda ts, dtype: untile(ts[0])
