"""Figures that say whether a model's routing is worth caching: token-to-token reuse, skew, domain overlap."""

import math

import numpy as np

from .trace import Trace


def next_token_reuse(trace: Trace) -> np.ndarray:
    """Per MoE layer, the mean share of a token's k experts that the next token also uses (uniform: k/E)."""
    e = trace.experts.astype(np.int64)
    if e.shape[0] < 2:
        raise ValueError("next_token_reuse needs at least two tokens")
    same = (e[1:, :, :, None] == e[:-1, :, None, :]).any(axis=-1)  # [T-1, M, k]
    return same.mean(axis=(0, 2))


def expert_counts(trace: Trace) -> np.ndarray:
    """Per MoE layer, how many times each expert was chosen: int64 [M, num_experts]."""
    counts = np.zeros((trace.experts.shape[1], trace.num_experts), dtype=np.int64)
    for m in range(counts.shape[0]):
        counts[m] = np.bincount(trace.experts[:, m].reshape(-1).astype(np.int64), minlength=trace.num_experts)
    return counts


def popularity_entropy(trace: Trace) -> np.ndarray:
    """Per MoE layer, the entropy of expert popularity divided by log(num_experts): 1 uniform, 0 one expert."""
    counts = expert_counts(trace).astype(np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / math.log(trace.num_experts)


def hot_sets(trace: Trace, share: float = 0.25) -> list[set[int]]:
    """Per MoE layer, the ceil(share * num_experts) most chosen experts (ties go to the lower expert id)."""
    n = math.ceil(share * trace.num_experts)
    counts = expert_counts(trace)
    return [set(np.argsort(-row, kind="stable")[:n].tolist()) for row in counts]


def hot_set_overlap(a: Trace, b: Trace, share: float = 0.25) -> np.ndarray:
    """Per MoE layer, the Jaccard overlap of two traces' hot sets (1 same experts, 0 disjoint)."""
    if a.num_experts != b.num_experts or not np.array_equal(a.layers, b.layers):
        raise ValueError("traces come from models with different MoE layers")
    return np.array([len(x & y) / len(x | y) for x, y in zip(hot_sets(a, share), hot_sets(b, share))])
