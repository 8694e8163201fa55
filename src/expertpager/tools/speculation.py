"""Speculative routing measured on a model: the experts each MoE layer actually picks for each token, and what
the next-layer predictor (the same `speculate` the live prefetcher uses) picks for the layers ahead of it."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..errors import ExpertPagerError
from ..model.read_layout import read_layout
from ..runtime.load import no_transformers_bars
from ..runtime.moe_layers import moe_layers, routed_windows, speculate
from ..runtime.speculator import Speculator, find_speculator
from .trace import Trace


@torch.inference_mode()
def speculation(model: PreTrainedModel, tokens: np.ndarray, lookahead: int = 3, extra: int = 0,
                chunk: int = 256, speculator: Speculator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over `tokens` in independent windows of `chunk` (as `record_trace` does) and return
    (actual int64 [T, M, k], predicted int64 [T, M, lookahead, k + extra]): predicted[t, m, d-1] is layer m+d's
    router (or `speculator`'s fitted map, where it has one) applied to layer m's residual stream, -1 past the
    last layer."""
    layers = moe_layers(model)
    actual, predicted = [], []
    for n, hidden, router in routed_windows(model, tokens, chunk):
        k = router[0][2].shape[-1]
        actual.append(torch.stack([router[i][2].reshape(n, k) for i in range(len(layers))], 1))
        guess = torch.full((n, len(layers), lookahead, k + extra), -1, dtype=torch.long)
        for i in range(len(layers)):
            for d in range(1, lookahead + 1):
                if i + d < len(layers):
                    fitted = speculator.get(layers[i + d].index, d) if speculator else None
                    guess[:, i, d - 1] = speculate(layers[i + d], hidden[i], extra, fitted)
        predicted.append(guess)
    return torch.cat(actual).long().numpy(), torch.cat(predicted).numpy()


def recall_precision(actual: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted MoE layer and look-ahead distance: (recall, precision) of predicted slices, [M, D] each, NaN
    where no layer lies that far behind. recall = share of the target layer's experts predicted; precision = share
    of predicted experts the target layer uses."""
    t, m, k = actual.shape
    dists = predicted.shape[2]
    recall = np.full((m, dists), np.nan)
    precision = np.full((m, dists), np.nan)
    for i in range(m):
        for d in range(1, dists + 1):
            if i + d >= m:
                continue
            guess = predicted[:, i, d - 1]
            hits = (guess[:, :, None] == actual[:, i + d, None, :]).any(-1).sum()
            recall[i + d, d - 1] = hits / (t * k)
            precision[i + d, d - 1] = hits / guess.size
    return recall, precision


def trace_speculation(model_ref: str, traces: dict[str, Trace]) -> dict[str, np.ndarray]:
    """One-layer-ahead predictions for each trace's tokens, from the model in its stored dtype or else float32
    (the dtype traces are often recorded in), whichever reproduces the trace's own routing; with the fitted maps
    of the model folder's speculator when it has one, as the runtime's next-layer predictor does."""
    layout = read_layout(model_ref)
    path = layout.path
    out = {}
    for dtype in ("auto", torch.float32):
        with no_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        fitted = find_speculator(path, None, [l.index for l in moe_layers(model)], model.config.hidden_size,
                                 layout.num_experts)
        for name, trace in traces.items():
            actual, predicted = speculation(model, trace.tokens, lookahead=1, speculator=fitted)
            if name not in out and np.array_equal(np.sort(actual, -1), np.sort(trace.experts.astype(np.int64), -1)):
                out[name] = predicted
        if len(out) == len(traces):
            return out
    missing = ", ".join(n for n in traces if n not in out)
    raise ExpertPagerError(f"{missing}: {model_ref} routes these tokens differently from the trace; was it traced "
                           "with this model and windows of 256 tokens?")
