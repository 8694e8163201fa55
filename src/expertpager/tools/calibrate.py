"""Fit a speculator (runtime/speculator.py) on calibration text: for each MoE layer t and distance d, a ridge
regression of layer t's actual router logits on the RMS-normalised residual stream entering the post-attention
norm of the MoE layer d before it, with an intercept, shrunk toward the plain speculation (t's router times its
norm's gain), so with little data it falls back to what the plain router predicts.

The statistics are accumulated while the model runs, layer by layer (hooks on each MoE layer's norm and router):
per source layer the upper triangle of its features' Gram matrix [(H+1)(H+2)/2, float64], per (source, target)
pair the features' products with the target's logits [(H+1) x E, float64]; a layer's features of the batch being
run are kept only until the last layer that reads them has run. Products are taken in float32 over a batch and
summed in float64. The fit is then one linear solve per pair. Stored: E x H + E per pair, the size of a router.
Windows run in batches, so a paged model reads each layer's experts once per batch rather than once per window.
"""

from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel

from ..errors import ExpertPagerError
from ..model.plan import PREFILL_CHUNK
from ..runtime.moe_layers import MoeLayer, moe_layers, rms_normalize
from ..runtime.speculator import Speculator

DEFAULT_SHRINK = 1e-3
BATCH_TOKENS = PREFILL_CHUNK  # tokens of windows run as one batch: the activations the memory plan reserves for


class Statistics:
    """Sufficient statistics for the ridge fits, accumulated layer by layer as the model runs."""

    def __init__(self, layers: list[MoeLayer], hidden: int, experts: int, ahead: int):
        self.layers, self.ahead, self.tokens = layers, ahead, 0
        self.width = n = hidden + 1  # features: the normalised hidden state and a constant 1
        rows, cols = torch.triu_indices(n, n)
        self.upper = rows * n + cols  # flat indices of the upper triangle
        self.gram = torch.zeros(len(layers), self.upper.numel(), dtype=torch.float64)
        self.cross = {(i, i + d): torch.zeros(n, experts, dtype=torch.float64)
                      for i in range(len(layers)) for d in range(1, ahead + 1) if i + d < len(layers)}
        self.features: dict[int, torch.Tensor] = {}  # source layer: features of the batch being run

    def add_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """MoE layer i's input [..., H] for the batch being run."""
        x = rms_normalize(hidden.reshape(-1, hidden.shape[-1]))
        f = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        self.gram[i] += (f.T @ f).flatten()[self.upper]
        self.features[i] = f
        self.features.pop(i - self.ahead - 1, None)  # the last layer that reads it (i - 1) has run
        if i == 0:
            self.tokens += f.shape[0]

    def add_logits(self, t: int, logits: torch.Tensor) -> None:
        """MoE layer t's router logits [rows, E] for the batch being run."""
        z = logits.reshape(-1, logits.shape[-1]).float()
        for d in range(1, self.ahead + 1):
            if (t - d, t) in self.cross:
                self.cross[(t - d, t)] += self.features[t - d].T @ z

    def gram_matrix(self, i: int) -> torch.Tensor:
        """Source layer i's full Gram matrix [(H+1) x (H+1)], float64."""
        n = self.width
        full = torch.zeros(n * n, dtype=torch.float64)
        full[self.upper] = self.gram[i]
        full = full.view(n, n)
        return full + full.T - torch.diag(full.diagonal())


def statistics_bytes(num_layers: int, hidden: int, experts: int, ahead: int, rows: int = BATCH_TOKENS) -> int:
    """Memory calibration takes beyond the model: the statistics, a batch's features for `ahead` + 1 layers and a
    Gram product, and a solve's working matrices."""
    n = hidden + 1
    pairs = sum(max(0, num_layers - d) for d in range(1, ahead + 1))
    upper = n * (n + 1) // 2
    return (num_layers * upper * 8 + pairs * n * experts * 8 + (ahead + 1) * rows * n * 4 + n * n * 4 + upper * 8
            + 3 * n * n * 8)


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
        gram = stats.gram_matrix(i)
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
            on_window: Callable[[], None] = lambda: None, batch_tokens: int = BATCH_TOKENS) -> Statistics:
    """Run `model` over `token_ids` in independent windows of `chunk` (as traces and speculation do), whole windows
    in batches of about `batch_tokens`, and accumulate the statistics for distances 1..`ahead`."""
    layers = moe_layers(model)
    if len(layers) < 2:
        raise ExpertPagerError("calibration needs a model with at least two MoE layers")
    ahead = min(ahead, len(layers) - 1)
    stats = Statistics(layers, model.config.hidden_size, layers[0].router.weight.shape[0], ahead)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.norm.register_forward_pre_hook(lambda _m, args, i=i: stats.add_hidden(i, args[0])))
        handles.append(layer.router.register_forward_hook(lambda _m, _a, out, i=i: stats.add_logits(i, out[0])))
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).reshape(-1)
    whole = ids.numel() // chunk
    per_batch = max(1, batch_tokens // chunk)
    batches = [ids[b * chunk:min(b + per_batch, whole) * chunk].view(-1, chunk) for b in range(0, whole, per_batch)]
    if ids.numel() > whole * chunk:
        batches.append(ids[whole * chunk:][None])
    try:
        for rows in batches:
            model(input_ids=rows, use_cache=False)
            stats.features.clear()
            for _ in range(rows.shape[0]):
                on_window()
    finally:
        for h in handles:
            h.remove()
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
