"""Memory plan: how a byte promise splits into resident weights, a reserve, and the expert cache."""

import math
from dataclasses import asdict, dataclass

from .layout import Layout

MiB = 2**20
RUNTIME_OVERHEAD = 1024 * MiB
"""Python, torch, transformers and tokenizer loaded and running. RSS counts the shared libraries' file pages the
process has mapped, which depends on what the page cache holds: measured 590-1,040 MiB less resident + cache on
Linux, torch 2.13 CPU, for the same run."""
COMPACT_RUNTIME_OVERHEAD = 640 * MiB
"""The same for a GGUF in the compact tier, whose resident tensors load one at a time (no transformers loading):
measured on a 4.96 GB Q4_K_M file, 64-token prompt, 350 MB cache, 637 MB resident: peak anonymous RSS 1,457 MB (470
MB over resident + cache) plus 111 MB of mapped library pages."""
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 64
"""Prefill activations: a generous multiple of tokens x hidden x 4 bytes kept live at once."""
DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 1024
"""Prompt tokens per forward pass (runtime/generate.py): prefill activations stay bounded by this many tokens."""


@dataclass(frozen=True)
class MemoryPlan:
    max_memory: int
    resident_bytes: int
    reserve_bytes: int
    cache_bytes: int  # what is left for expert slices; negative when the promise does not fit
    slice_bytes: int  # one cache slot: the largest slice as the cache holds it, widened for aligned reads
    min_cache_bytes: int  # one layer's top-k slices pinned at once, plus staging buffers
    cache_slices: int
    cache_fraction: float
    staging_bytes: int = 0  # raw bytes in flight to a decode step (dequantized tier), inside cache_bytes

    @property
    def fits(self) -> bool:
        return self.cache_bytes >= self.min_cache_bytes

    @property
    def shortfall(self) -> int:
        """Bytes missing for the minimum cache (0 when it fits)."""
        return max(0, self.min_cache_bytes - self.cache_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "shortfall": self.shortfall}


def _geometry(layout: Layout) -> tuple[int, int, int]:
    """(hidden size, KV heads x head dim, layers with a KV cache) from an HF config or GGUF metadata."""
    c, a = layout.config, layout.architecture
    hidden = c.get("hidden_size") or c.get(f"{a}.embedding_length") or 0
    heads = c.get("num_attention_heads") or c.get(f"{a}.attention.head_count") or 1
    kv_heads = c.get("num_key_value_heads") or c.get(f"{a}.attention.head_count_kv") or heads
    head_dim = c.get("head_dim") or c.get(f"{a}.attention.key_length") or (hidden // heads if heads else 0)
    if isinstance(kv_heads, list):  # GGUF may store per-layer head counts
        kv_heads = max(kv_heads)
    return int(hidden), int(kv_heads) * int(head_dim), layout.num_layers - len(linear_attention_layers(layout))


def _linear(layout: Layout, hf_key: str, gguf_key: str) -> int:
    value = layout.config.get(hf_key) or layout.config.get(f"{layout.architecture}.{gguf_key}")
    return int(value or 0)


def linear_attention_layers(layout: Layout) -> list[int]:
    """The Gated DeltaNet (linear attention) layers: from the HF config's layer_types (or, without it, every layer
    but each full_attention_interval-th), or the GGUF's attention.recurrent_layers / full_attention_interval."""
    c, a = layout.config, layout.architecture
    if isinstance(c.get("layer_types"), list):
        return [i for i, t in enumerate(c["layer_types"]) if t == "linear_attention"]
    if isinstance(c.get(f"{a}.attention.recurrent_layers"), list):
        return [i for i, r in enumerate(c[f"{a}.attention.recurrent_layers"]) if r]
    interval = c.get("full_attention_interval") or c.get(f"{a}.full_attention_interval")
    if interval is None and "linear_num_value_heads" in c:
        interval = 4  # transformers' default
    return [i for i in range(layout.num_layers) if (i + 1) % interval] if interval else []


def linear_state_bytes(layout: Layout) -> int:
    """The fixed-size state of all linear-attention layers (it does not grow with the context): a float32
    recurrent state of value heads x key dim x value dim, and the convolution's window over q, k and v."""
    heads = _linear(layout, "linear_num_value_heads", "ssm.time_step_rank")
    key_dim = _linear(layout, "linear_key_head_dim", "ssm.state_size")
    key_heads = _linear(layout, "linear_num_key_heads", "ssm.group_count")
    kernel = _linear(layout, "linear_conv_kernel_dim", "ssm.conv_kernel")
    value_width = _linear(layout, "", "ssm.inner_size") or heads * _linear(layout, "linear_value_head_dim", "")
    per_layer = value_width * key_dim + (2 * key_heads * key_dim + value_width) * kernel
    return len(linear_attention_layers(layout)) * per_layer * 4


def hidden_size(layout: Layout) -> int:
    """The model's hidden size, from an HF config or GGUF metadata."""
    return _geometry(layout)[0]


def reserve_bytes(layout: Layout, context_tokens: int = DEFAULT_CONTEXT, overhead: int = RUNTIME_OVERHEAD) -> int:
    """Runtime `overhead` + bf16 KV cache for `context_tokens` (full-attention layers) + linear-attention state +
    activations of one prefill chunk."""
    hidden, kv_width, layers = _geometry(layout)
    kv = 2 * layers * kv_width * context_tokens * 2
    activations = ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN * hidden * min(context_tokens, PREFILL_CHUNK)
    return overhead + kv + linear_state_bytes(layout) + activations


def resident_in_memory(layout: Layout, itemsize: int | None) -> int:
    """Bytes the resident tensors take once loaded: as stored, or (for weights converted at load, e.g. GGUF blocks
    dequantized) elements x the compute dtype's `itemsize`."""
    if itemsize is None:
        return layout.resident_bytes
    return sum(math.prod(t.shape) * itemsize for t in layout.resident)


def plan_memory(layout: Layout, max_memory: int, slot_bytes: int | None = None,
                context_tokens: int = DEFAULT_CONTEXT, staging: int = 0, resident: int | None = None,
                overhead: int = RUNTIME_OVERHEAD) -> MemoryPlan:
    """Split `max_memory` (the whole process) into resident + reserve (runtime `overhead` included) + cache of slots
    of `slot_bytes`."""
    reserve = reserve_bytes(layout, context_tokens, overhead)
    resident = layout.resident_bytes if resident is None else resident
    return plan_cache(layout, max_memory - resident - reserve, slot_bytes, max_memory, reserve, staging, resident)


def plan_cache(layout: Layout, cache_bytes: int, slot_bytes: int | None = None, max_memory: int = 0,
               reserve: int = 0, staging: int = 0, resident: int | None = None) -> MemoryPlan:
    """The plan for a cache of `cache_bytes` given directly; slots default to the largest slice; `staging` bytes
    of the cache go to decode staging buffers."""
    slice_bytes = slot_bytes or layout.slice_bytes
    slots = min(len(layout.slices), max(0, (cache_bytes - staging) // slice_bytes))
    return MemoryPlan(max_memory, layout.resident_bytes if resident is None else resident, reserve, cache_bytes, slice_bytes,
                      layout.experts_per_token * slice_bytes + staging, slots, min(1.0, slots / len(layout.slices)),
                      staging)
