"""What the page draws of the expert cache: for every (layer, expert) slice whether it is cached or pinned now and
how hot it is (its recent use by the router), plus the pager's totals, as one JSON-ready dict."""

import threading

import numpy as np
import torch
from transformers import PreTrainedModel

from ..runtime.moe_layers import moe_layers

DECAY = 0.8
"""Per forward pass of a layer, a slice's heat is multiplied by this before the routed slices add their rows."""


class CacheView:
    """Hooks on the paged experts modules of `model` keep each slice's heat; `snapshot()` reads the rest from the
    pager."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.layers = [layer.index for layer in moe_layers(model)]
        self.num_experts = model.layout.num_experts
        self.heat = np.zeros((len(self.layers), self.num_experts))
        self._lock = threading.Lock()
        for pos, layer in enumerate(moe_layers(model)):
            layer.experts.register_forward_pre_hook(self._hook(pos))

    def _hook(self, pos: int):
        def hook(_module, args):
            counts = torch.bincount(args[1].reshape(-1), minlength=self.num_experts).numpy()
            with self._lock:
                self.heat[pos] = self.heat[pos] * DECAY + counts / max(1, args[1].shape[0])
        return hook

    def snapshot(self) -> dict:
        """Rows of one character per expert: state '0' not cached, '1' cached, '2' pinned; heat '0'-'9'."""
        pager = self.model.pager
        held = pager.occupancy()
        row = {layer: i for i, layer in enumerate(self.layers)}
        state = np.zeros((len(self.layers), self.num_experts), dtype=np.int8)
        for key, (_, pins) in held.items():
            if len(key) == 2:  # an expert slice (an adapter's pieces count in the bytes only)
                state[row[key[0]], key[1]] = 2 if pins else 1
        with self._lock:
            heat = self.heat.copy()
        level = np.minimum(9, np.ceil(9 * heat / max(1.0, heat.max()))).astype(int)
        s = pager.stats_snapshot()
        return {
            "layers": self.layers, "experts": self.num_experts,
            "state": ["".join(map(str, r)) for r in state], "heat": ["".join(map(str, r)) for r in level],
            "cached": int((state > 0).sum()), "pinned": int((state == 2).sum()), "hot": int((level >= 5).sum()),
            "cache_bytes_used": sum(size for size, _ in held.values()),
            "cache_budget_bytes": self.model.memory_plan.cache_bytes, "slots": pager.num_slots,
            "hits": s.hits, "pins": s.pins, "hit_rate": s.hit_rate, "bytes_read": s.bytes_read,
        }
