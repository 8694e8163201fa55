"""Prefetcher: hooks a paged model so its predictors see each layer's hidden state and routing, and queues the
slices they predict with the pager while the layer computes."""

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from ..model.layout import SliceKey
from .moe_layers import moe_layers
from .predictors import Predictor, Routed


class Prefetcher:
    """Feeds `predictors` from hooks on `model` (built by `load`): a pre-hook on each post-attention norm keeps
    the last positions' residual stream, a hook on each router keeps their experts and counts a prefill's
    routing, and the paged experts' `on_route` (called before a layer pins its slices) asks the predictors, whose
    slices the experts queue with their pin, behind their own loads.
    A layer's predicted slices still queued when the layer routes elsewhere are cancelled."""

    def __init__(self, model: PreTrainedModel, predictors: Sequence[Predictor]):
        self.pager = model.pager
        self.predictors = list(predictors)
        self.layers = moe_layers(model)
        num_experts = model.layout.num_experts
        for p in self.predictors:
            p.start(self.layers, num_experts, self.pager.num_slots)
        self.hidden: dict[int, torch.Tensor] = {}
        self.experts: dict[int, list[int]] = {}
        self.counts = np.zeros((len(self.layers), num_experts), dtype=np.int64)
        self.prefill = False
        self.pending: dict[int, set[SliceKey]] = {}
        self.handles = [model.register_forward_hook(self._forward_done)]
        for pos, layer in enumerate(self.layers):
            self.handles.append(layer.norm.register_forward_pre_hook(self._keep_hidden(layer.index)))
            self.handles.append(layer.router.register_forward_hook(self._keep_route(pos, layer.index)))
            layer.experts.on_route = self._routed

    def _keep_hidden(self, index: int):
        def hook(_module, args):
            h = args[0]
            self.prefill = self.prefill or (h.dim() == 3 and h.shape[1] > 1)
            self.hidden[index] = h[:, -1] if h.dim() == 3 else h[-1:]
        return hook

    def _keep_route(self, pos: int, index: int):
        def hook(_module, _args, output):
            top = output[2]
            last = top.reshape(self.hidden[index].shape[0], -1, top.shape[-1])[:, -1]
            self.experts[index] = sorted(set(last.reshape(-1).tolist()))
            if self.prefill:
                self.counts[pos] += np.bincount(top.reshape(-1).numpy(), minlength=self.counts.shape[1])
        return hook

    def _routed(self, layer: int, hit: list[int]) -> list[SliceKey]:
        """The slices to prefetch once this layer's are claimed (the paged experts pass them with their pin)."""
        used = {(layer, e) for e in hit}
        stale = self.pending.pop(layer, set()) - used
        if stale:
            self.pager.cancel_prefetches(stale)
        event = Routed(layer, self.experts[layer], self.hidden[layer])
        keys = list(dict.fromkeys(k for p in self.predictors for k in p.routed(event)))
        for key in keys:
            self.pending.setdefault(key[0], set()).add(key)
        return keys

    def _forward_done(self, _module, _args, _output) -> None:
        if self.prefill:
            self.pager.prefetch(dict.fromkeys(k for p in self.predictors for k in p.prompt(self.counts)))
        self.prefill = False
        self.counts[:] = 0

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            layer.experts.on_route = None
