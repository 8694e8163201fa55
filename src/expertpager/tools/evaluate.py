"""Held-out loss of a causal language model, computed in independent windows so memory stays small."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, input_ids: torch.Tensor, window: int = 256) -> tuple[float, float, int]:
    """Return (mean next-token loss, perplexity, tokens predicted) over non-overlapping windows of `input_ids`."""
    ids = input_ids.reshape(-1)
    total, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window]
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk[None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    if count == 0:
        raise ValueError("evaluate_loss needs at least two tokens")
    loss = total / count
    return loss, math.exp(loss), count
