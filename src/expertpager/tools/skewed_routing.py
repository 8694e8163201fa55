"""Synthetic skewed routing, for benchmarks and tests before (or besides) a trained model's traces: per layer a
Zipf popularity over experts (a different order in each layer) and a chance to keep the previous token's experts."""

import numpy as np

from .trace import Trace


def skewed_trace(tokens: int, layers: int, experts: int, k: int, zipf: float = 1.0, reuse: float = 0.3,
                 seed: int = 0) -> Trace:
    """A Trace of `tokens` tokens through `layers` MoE layers (0..layers-1) picking `k` of `experts` each."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** zipf
    popularity /= popularity.sum()
    orders = [rng.permutation(experts) for _ in range(layers)]
    out = np.zeros((tokens, layers, k), dtype=np.int16)
    for t in range(tokens):
        for m in range(layers):
            keep = [e for e in out[t - 1, m] if rng.random() < reuse] if t else []
            p = popularity.copy()
            ranks = np.argsort(orders[m])
            p[ranks[keep]] = 0.0
            fresh = orders[m][rng.choice(experts, k - len(keep), replace=False, p=p / p.sum())]
            out[t, m] = list(keep) + fresh.tolist()
    return Trace(experts=out, weights=np.full(out.shape, 1.0 / k, dtype=np.float32),
                 layers=np.arange(layers, dtype=np.int32), tokens=np.zeros(tokens, dtype=np.int64),
                 num_experts=experts, domain="synthetic", source=f"skewed_trace(zipf={zipf}, reuse={reuse}, seed={seed})")
