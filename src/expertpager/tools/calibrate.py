"""Fit a speculator (runtime/speculator.py) on calibration text: for each MoE layer t and distance d, a ridge
regression of layer t's actual router logits on the RMS-normalised residual stream entering the post-attention
norm of the MoE layer d before it, with an intercept, shrunk toward the plain speculation (t's router times its
norm's gain), so with little data it falls back to what the plain router predicts.

One pass over the text accumulates, per source layer, the Gram matrix of its features [(H+1)^2, float64] and, per
(source, target) pair, the features' products with the target's logits [(H+1) x E]; the fit is then one linear
solve per pair. Stored: E x H + E per pair, the size of a router.
"""

from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel

from ..errors import ExpertPagerError
from ..runtime.moe_layers import MoeLayer, moe_layers, rms_normalize, routed_windows
from ..runtime.speculator import Speculator

DEFAULT_SHRINK = 1e-3


class Statistics:
    """Sufficient statistics for the ridge fits, accumulated window by window."""

    def __init__(self, layers: list[MoeLayer], hidden: int, experts: int, ahead: int):
        self.layers, self.ahead, self.tokens = layers, ahead, 0
        m = len(layers)
        self.gram = torch.zeros(m, hidden + 1, hidden + 1, dtype=torch.float64)
        self.cross = {(i, i + d): torch.zeros(hidden + 1, experts, dtype=torch.float64)
                      for i in range(m) for d in range(1, ahead + 1) if i + d < m}

    def add(self, hidden: dict[int, torch.Tensor], logits: dict[int, torch.Tensor]) -> None:
        """One window: `hidden[i]` [n, H] entering MoE layer i's norm, `logits[i]` [n, E] of its router."""
        feats = {}
        for i, h in hidden.items():
            x = rms_normalize(h)
            feats[i] = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
            self.gram[i] += feats[i].T @ feats[i]
        for (i, t), c in self.cross.items():
            c += feats[i].T @ logits[t].double()
        self.tokens += next(iter(hidden.values())).shape[0]


def plain_map(layer: MoeLayer) -> torch.Tensor:
    """The plain speculation as a map on RMS-normalised input, [E, H]: the router's weight times the norm's gain."""
    gain = getattr(layer.norm, "weight", None)
    weight = layer.router.weight.detach().float()
    return weight * gain.detach().float() if gain is not None else weight


def solve(stats: Statistics, shrink: float = DEFAULT_SHRINK) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Ridge fits from `stats`: minimise |[X 1] [A b]^T - Z|^2 + shrink * n * |A - A_plain|^2 per (source, target);
    features have unit mean square, so `shrink` is relative to the data. Keyed (target layer index, distance)."""
    n = stats.tokens
    out = {}
    for (i, t), cross in stats.cross.items():
        gram = stats.gram[i]
        h = gram.shape[0] - 1
        prior = torch.zeros(h + 1, cross.shape[1], dtype=torch.float64)
        prior[:h] = plain_map(stats.layers[t]).double().T
        penalty = torch.full((h + 1,), shrink * n, dtype=torch.float64)
        penalty[h] = 0.0
        sol = torch.linalg.solve(gram + torch.diag(penalty), cross + penalty[:, None] * prior)
        out[(stats.layers[t].index, t - i)] = (sol[:h].T.float().contiguous(), sol[h].float().contiguous())
    return out


def windows(tokens: int, chunk: int = 256) -> int:
    """How many windows `collect` runs over `tokens` tokens (for a progress bar)."""
    return -(-tokens // chunk)


@torch.inference_mode()
def collect(model: PreTrainedModel, token_ids: "list[int] | np.ndarray", ahead: int = 1, chunk: int = 256,
            on_window: Callable[[], None] = lambda: None) -> Statistics:
    """Run `model` over `token_ids` in independent windows of `chunk` (as traces and speculation do) and
    accumulate the statistics for distances 1..`ahead`."""
    layers = moe_layers(model)
    if len(layers) < 2:
        raise ExpertPagerError("calibration needs a model with at least two MoE layers")
    ahead = min(ahead, len(layers) - 1)
    stats = Statistics(layers, model.config.hidden_size, layers[0].router.weight.shape[0], ahead)
    for n, hidden, router in routed_windows(model, token_ids, chunk):
        stats.add(hidden, {i: out[0].reshape(n, -1).float() for i, out in router.items()})
        on_window()
    return stats


def calibrate(model: PreTrainedModel, token_ids: "list[int] | np.ndarray", ahead: int = 1,
              shrink: float = DEFAULT_SHRINK, chunk: int = 256, on_window: Callable[[], None] = lambda: None) -> Speculator:
    """A speculator for `model` fitted on `token_ids`, for look-ahead distances 1..`ahead` (in MoE layers)."""
    if len(token_ids) < 2:
        raise ExpertPagerError("calibration needs at least two tokens of text")
    stats = collect(model, token_ids, ahead, chunk, on_window)
    layers = moe_layers(model)
    return Speculator(solve(stats, shrink), [l.index for l in layers], model.config.hidden_size,
                      layers[0].router.weight.shape[0], model.config.model_type,
                      {"tokens": stats.tokens, "shrink": shrink})
