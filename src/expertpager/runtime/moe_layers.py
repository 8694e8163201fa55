"""A model's MoE layers as the predictors see them: the post-attention norm, the router and the experts module of
each decoder layer that routes, and the router applied speculatively to another layer's hidden state."""

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LAYER_PREFIX = re.compile(r"^(.*\blayers\.(\d+))\.(?:mlp|block_sparse_moe)$")


@dataclass(frozen=True)
class MoeLayer:
    index: int  # decoder layer index, as in the slice keys
    norm: nn.Module  # the decoder layer's post_attention_layernorm, whose output the router reads
    router: nn.Module  # returns (router_logits, top_k_weights, top_k_index)
    experts: nn.Module


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE block (a module with `.experts` and a `.gate` or `.router`), in layer order."""
    out = []
    for name, block in model.named_modules():
        m = LAYER_PREFIX.match(name)
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if m and hasattr(block, "experts") and router is not None:
            norm = model.get_submodule(m.group(1)).post_attention_layernorm
            out.append(MoeLayer(int(m.group(2)), norm, router, block.experts))
    return sorted(out, key=lambda l: l.index)


def speculate(layer: MoeLayer, hidden: torch.Tensor, extra: int = 0,
              fitted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The experts `layer` would pick for `hidden` [N, H], taken from an earlier layer's residual stream: its own
    norm and router applied to it (both called through `forward`, so no hooks fire), or with `fitted` (weight
    [E, H], bias [E] from a Speculator) the fitted logits of the RMS-normalised `hidden` in place of both.
    Returns [N, k + extra]: the top-k, then the next `extra` experts by logit; a negative `extra` keeps only the
    k + extra highest."""
    if fitted is not None:
        weight, bias = fitted
        logits = torch.addmm(bias, rms_normalize(hidden.reshape(hidden.shape[0], -1)), weight.T)
        return logits.topk(layer.router.top_k + extra, dim=-1).indices
    logits, _, index = layer.router.forward(layer.norm.forward(hidden))
    index = index.reshape(hidden.shape[0], -1)
    if not extra:
        return index
    logits = logits.reshape(hidden.shape[0], -1).float()
    if extra < 0:  # the router's picks with the highest logits (some routers do not sort their top-k)
        order = logits.gather(1, index).argsort(dim=1, descending=True, stable=True)
        return index.gather(1, order[:, :index.shape[1] + extra])
    logits = logits.scatter(1, index, float("-inf"))
    return torch.cat([index, logits.topk(extra, dim=-1).indices], dim=1)


def rms_normalize(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` [N, H] in float32 divided by its root mean square: a residual stream as an RMSNorm sees it, before
    the norm's gain (the input of a fitted speculator's maps, which carry the gain themselves)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.inference_mode()
def routed_windows(model: nn.Module, token_ids: "list[int] | np.ndarray", chunk: int = 256
                   ) -> Iterator[tuple[int, dict[int, torch.Tensor], dict[int, tuple]]]:
    """Run `model` over `token_ids` in independent windows of `chunk` (each starts with an empty context, as
    traces do) and yield, per window, (tokens n, hidden, router): hidden[i] is the residual stream entering MoE
    layer i's post-attention norm [n, H], router[i] that layer's router output (logits, weights, index)."""
    layers = moe_layers(model)
    hidden: dict[int, torch.Tensor] = {}
    router: dict[int, tuple] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.norm.register_forward_pre_hook(lambda _m, args, i=i: hidden.__setitem__(i, args[0])))
        handles.append(layer.router.register_forward_hook(lambda _m, _a, out, i=i: router.__setitem__(i, out)))
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).reshape(-1)
    try:
        for start in range(0, ids.numel(), chunk):
            window = ids[start:start + chunk]
            model(input_ids=window[None], use_cache=False)
            n = window.numel()
            yield n, {i: h.reshape(n, -1) for i, h in hidden.items()}, dict(router)
    finally:
        for h in handles:
            h.remove()
