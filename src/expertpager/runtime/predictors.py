"""Predictors: which expert slices a model will need soon, so the pager can read them before they are pinned.

Each turns events into slice keys: `routed` once a layer's slices are pinned (its hidden state and experts),
`prompt` after a prefill (the prompt's routing counts). `Prefetcher` (prefetcher.py) feeds them from hooks and
queues what they return; a prediction only changes when bytes arrive, never what is computed.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpertPagerError
from ..model.layout import SliceKey
from .moe_layers import MoeLayer, speculate
from .profiles import Profile, closest, default_profiles_dir, load_profiles
from .speculator import Speculator


@dataclass
class Routed:
    layer: int  # decoder layer whose experts are now pinned
    experts: list[int]  # experts the last position of each sequence uses in that layer
    hidden: torch.Tensor | None  # residual stream entering that layer's post-attention norm, last positions [B, H]


class Predictor:
    """Base class: override `routed` and/or `prompt`."""

    name = "predictor"

    def start(self, layers: list[MoeLayer], num_experts: int, slots: int) -> None:
        """Called once with the model's MoE layers, its experts per layer and the cache's slot count."""
        self.layers = layers

    def routed(self, event: Routed) -> list[SliceKey]:
        return []

    def prompt(self, counts: np.ndarray) -> list[SliceKey]:
        return []


class NextLayer(Predictor):
    """Speculative routing: layers l+1..l+lookahead's norm and router applied to layer l's residual stream.

    An approximation: the residual stream changes little from one layer to the next, so the next router mostly
    picks the same experts from it as from its own input. With a `speculator` (fitted on calibration text, see
    runtime/speculator.py) its map for (target layer, distance) replaces the router where it has one. `extra` adds
    the next-best experts by logit; a negative `extra` predicts only the k + extra likeliest."""

    name = "next-layer"

    def __init__(self, lookahead: int = 1, extra: int = 0, speculator: Speculator | None = None):
        self.lookahead, self.extra, self.speculator = lookahead, extra, speculator

    def start(self, layers: list[MoeLayer], num_experts: int, slots: int) -> None:
        super().start(layers, num_experts, slots)
        self.position = {l.index: i for i, l in enumerate(layers)}
        k = layers[0].router.top_k if layers else 1
        if not 0 < k + self.extra <= num_experts:
            raise ExpertPagerError(f"next-layer{self.extra:+d}: the model routes to {k} of {num_experts} experts, "
                                   f"so next-layer predicts {k}{self.extra:+d} = {k + self.extra}; use 1 to {num_experts}")

    def routed(self, event: Routed) -> list[SliceKey]:
        at = self.position[event.layer]
        keys: list[SliceKey] = []
        for d, target in enumerate(self.layers[at + 1: at + 1 + self.lookahead], 1):
            fitted = self.speculator.get(target.index, d) if self.speculator else None
            experts = speculate(target, event.hidden, self.extra, fitted).reshape(-1).tolist()
            keys += [(target.index, e) for e in dict.fromkeys(experts)]
        return keys


class Temporal(Predictor):
    """Reuse: the next layer's experts of the previous token (after the last layer: this token's first layer)."""

    name = "temporal"

    def start(self, layers: list[MoeLayer], num_experts: int, slots: int) -> None:
        super().start(layers, num_experts, slots)
        order = [l.index for l in layers]
        self.following = dict(zip(order, order[1:] + order[:1]))
        self.last: dict[int, list[int]] = {}

    def routed(self, event: Routed) -> list[SliceKey]:
        self.last[event.layer] = event.experts
        target = self.following[event.layer]
        return [(target, e) for e in self.last.get(target, ())]


class Domain(Predictor):
    """Pre-warm: after a prefill, the hottest slices of the stored profile closest to the prompt's routing
    (`share` of the cache's slots), in layer order so the first layers arrive first."""

    name = "domain"

    def __init__(self, profiles: str | Path | Sequence[Profile] | None = None, share: float = 0.5):
        self.source = default_profiles_dir() if profiles is None else profiles
        self.share = share
        self.chosen: tuple[str, float] | None = None  # (profile name, similarity) of the last prompt

    def start(self, layers: list[MoeLayer], num_experts: int, slots: int) -> None:
        super().start(layers, num_experts, slots)
        order = [l.index for l in layers]
        if isinstance(self.source, (str, Path)):
            self.profiles = load_profiles(self.source, order, num_experts)
        else:
            self.profiles = [p for p in self.source if p.layers == order and p.counts.shape[1] == num_experts]
        self.count = int(self.share * slots)

    def prompt(self, counts: np.ndarray) -> list[SliceKey]:
        best, score = closest(self.profiles, counts)
        if best is None:
            return []
        self.chosen = (best.name, score)
        return sorted(best.hottest(self.count))


NEXT_LAYER = re.compile(r"next-layer(?::(\d+))?([+-]\d+)?$")


def make_predictors(spec: "str | Sequence[str | Predictor] | None", profiles: str | Path | None = None) -> list[Predictor]:
    """Predictors from names ('next-layer,temporal,domain'; 'next-layer:2+4' looks 2 layers ahead with 4 extra
    experts, 'next-layer-2' predicts only the top k-2; 'none' or None for none) or instances; `profiles` is the
    domain predictor's folder. Next-layer predictors made from names use the plain routers until given a
    `speculator` (`load` gives them the model's)."""
    if spec is None:
        return []
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        nl = NEXT_LAYER.match(item) if isinstance(item, str) else None
        if isinstance(item, Predictor):
            out.append(item)
        elif item == "none":
            continue
        elif nl:
            if int(nl.group(1) or 1) < 1:
                raise ExpertPagerError(f"{item}: look ahead at least 1 layer")
            out.append(NextLayer(int(nl.group(1) or 1), int(nl.group(2) or 0)))
        elif item == "temporal":
            out.append(Temporal())
        elif item == "domain":
            out.append(Domain(profiles))
        else:
            raise ExpertPagerError(f"unknown predictor {item!r}: use next-layer[:AHEAD][+EXTRA], temporal, domain or none")
    return out
