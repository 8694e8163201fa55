"""Attention for one new token, as the compact tier computes it. torch's CPU scaled_dot_product_attention takes a
slow path for a single bfloat16 query (measured here: 0.42 ms a layer at 100 cached tokens, 4.1 ms at 1,000, against
0.06 and 0.24 ms for the two matmuls below), so a decode step multiplies each key-value head's group of query heads
by its keys and values in float32 instead; a prompt (several queries) goes to transformers' sdpa as before. Both
paged and fully cached runs of the tier use it, so they stay equal bit for bit."""

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "expertpager_decode"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, Hq, Q, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv] ->
    ([B, Q, Hq, Dv], None). One query, no sinks or soft-capping: grouped float32 matmuls; else sdpa."""
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or kwargs.get("s_aux") is not None or kwargs.get("softcap") or heads % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = key.shape[1]
    q = query.reshape(batch, groups, heads // groups, dim).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # [B, 1, 1, T]: boolean (True = attend) or additive
        mask = attention_mask[..., -key.shape[2]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).to(query.dtype), None


def use_decode_attention(model: PreTrainedModel) -> None:
    """Make `model` (and its sub-models) attend through decode_attention, masks built as for sdpa."""
    AttentionInterface.register(NAME, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
