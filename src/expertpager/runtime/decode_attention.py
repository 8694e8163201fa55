"""Attention for one new token, as the compact tier computes it. torch's CPU scaled_dot_product_attention takes a
slow path for a single bfloat16 query (measured here: 0.42 ms a layer at 100 cached tokens, 4.1 ms at 1,000, against
0.10 and 0.23 ms for the two matmuls below), so a decode step multiplies each key-value head's group of query heads
by its keys and values as transformers' eager attention does (products in the model's dtype, softmax in float32);
a prompt (several queries) goes to transformers' sdpa as before. Its KV cache grows in blocks of KV_BLOCK tokens
(doubling up to there) rather than by concatenation (DynamicCache copies every cached key and value on every
token: 12 ms a token at 2,048 tokens of context here). Both paged and fully cached runs of the tier use both, so
they stay equal bit for bit."""

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "expertpager_decode"
KV_BLOCK = 512  # tokens a cache layer grows by, once it holds that many
KV_FIRST = 64  # the smallest room: rooms double from here up to KV_BLOCK


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, Hq, Q, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv] ->
    ([B, Q, Hq, Dv], None). One query, no sinks or soft-capping: grouped matmuls; else sdpa.

    Keys and values that are the first T positions of a BlockLayer's buffer are multiplied whole, the positions past
    T masked out (their values are zeros): the matmuls then keep one shape for a whole block, where a shape that
    grows by one every token makes oneDNN build a new bfloat16 kernel each time (about 1 ms), and copy the views."""
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or kwargs.get("s_aux") is not None or kwargs.get("softcap") or heads % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups, length = key.shape[1], key.shape[2]
    key, value = getattr(key, "whole", key), getattr(value, "whole", value)
    q = query.reshape(batch, groups, heads // groups, dim)
    scores = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2).float() * (dim ** -0.5 if scaling is None else scaling)
    scores[..., length:] = float("-inf")
    if attention_mask is not None:  # [B, 1, 1, T]: boolean (True = attend) or additive
        mask, seen = attention_mask[..., -length:], scores[..., :length]
        if mask.dtype == torch.bool:
            seen.masked_fill_(~mask, float("-inf"))
        else:
            seen.add_(mask.float())
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2), None


def use_decode_attention(model: PreTrainedModel) -> None:
    """Make `model` (and its sub-models) attend through decode_attention, masks built as for sdpa."""
    AttentionInterface.register(NAME, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


class BlockLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers grown KV_BLOCK tokens at a time; each view's
    `whole` attribute is its buffer (`Tensor._base` cannot say: inference mode does not track views)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        self.keys = self._grown(self.keys, key_states, old, new)
        self.values = self._grown(self.values, value_states, old, new)
        return self.keys, self.values

    @staticmethod
    def _grown(cached: torch.Tensor, states: torch.Tensor, old: int, new: int) -> torch.Tensor:
        """`cached` (the first `old` positions of its buffer) followed by `states`, as a view of a buffer with room
        for them (a new one, zero past the end, when there is none or it is full: room for a power of two of
        tokens from KV_FIRST up to KV_BLOCK, then a multiple of KV_BLOCK, so a short context is not multiplied as
        a whole block)."""
        buffer = getattr(cached, "whole", None)
        if buffer is None or buffer.shape[-2] < new:
            room = min(KV_FIRST, KV_BLOCK)
            while room < new and room < KV_BLOCK:
                room *= 2
            if room < new:
                room = -(-new // KV_BLOCK) * KV_BLOCK
            grown = states.new_zeros(*states.shape[:-2], room, states.shape[-1])
            if old:
                grown[..., :old, :] = cached
            buffer = grown
        buffer[..., old:new, :] = states
        view = buffer[..., :new, :]
        view.whole = buffer
        return view


def kv_cache(model: PreTrainedModel) -> DynamicCache:
    """A fresh KV cache for `model`: its full-attention layers grow by blocks when it attends through
    decode_attention, else transformers' own DynamicCache."""
    cache = DynamicCache(config=model.config)
    if model.config._attn_implementation == NAME:
        cache.layers = [BlockLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
