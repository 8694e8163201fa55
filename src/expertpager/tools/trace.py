"""Routing traces: which experts the router chose for each token in each MoE layer, and with what weight.

File format (`save_trace` / `load_trace`), one compressed `.npz` (`numpy.savez_compressed`) with these arrays:

    experts      int16   [T, M, k]  expert ids chosen for token t in the m-th MoE layer, in the router's order
                                    (torch.topk order: highest router probability first)
    weights      float32 [T, M, k]  the matching routing weights the experts' outputs are scaled by
                                    (renormalised over the top-k when the model's config says norm_topk_prob)
    layers       int32   [M]        decoder layer index of each MoE layer (dense layers are absent)
    tokens       int64   [T]        the token ids, in order
    num_experts  int64   scalar     routed experts per MoE layer
    domain       str     scalar     what kind of text, e.g. "code" or "prose" ("" if unknown)
    source       str     scalar     where the tokens came from, e.g. a file name and the model ("" if unknown)

T is the number of tokens, M the number of MoE layers, k the experts per token. Long inputs are run in
independent windows of `chunk` tokens (each window starts with an empty context), so memory stays small.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Trace:
    """Per-token, per-MoE-layer routing decisions of one model over one token sequence."""

    experts: np.ndarray
    weights: np.ndarray
    layers: np.ndarray
    tokens: np.ndarray
    num_experts: int
    domain: str = ""
    source: str = ""

    @property
    def num_tokens(self) -> int:
        """Number of tokens traced."""
        return int(self.experts.shape[0])

    @property
    def top_k(self) -> int:
        """Experts chosen per token per layer."""
        return int(self.experts.shape[2])


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """Return (layer index, block) for every module that has both a `.gate` router and `.experts`, by layer."""
    blocks = []
    for name, module in model.named_modules():
        match = _LAYER_INDEX.search(name + ".")
        if match and hasattr(module, "gate") and hasattr(module, "experts"):
            blocks.append((int(match.group(1)), module))
    if not blocks:
        raise ValueError("no MoE blocks (modules with .gate and .experts) found in the model")
    return sorted(blocks, key=lambda b: b[0])


def _num_experts(block: torch.nn.Module) -> int:
    """Routed experts of one MoE block: the experts module's `num_experts`, else the router weight's rows."""
    n = getattr(block.experts, "num_experts", None)
    return int(n) if n is not None else int(block.gate.weight.shape[0])


@torch.no_grad()
def record_trace(
    model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = 256, domain: str = "", source: str = ""
) -> Trace:
    """Run `model` over `input_ids` in windows of `chunk` tokens and record every MoE router's top-k choices."""
    ids = input_ids.reshape(-1).to(torch.long)
    blocks = moe_blocks(model)
    captured: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(blocks)

    def hook_for(slot: int):
        def hook(_module, _args, output):
            _logits, weights, index = output[:3]
            if weights.shape[-1] != index.shape[-1]:  # a router that returns dense [T, E] scores
                weights = weights.gather(-1, index)
            captured[slot] = (index.reshape(-1, index.shape[-1]), weights.reshape(-1, index.shape[-1]))

        return hook

    handles = [block.gate.register_forward_hook(hook_for(i)) for i, (_, block) in enumerate(blocks)]
    experts, weights = [], []
    try:
        for start in range(0, ids.numel(), chunk):
            window = ids[start : start + chunk]
            model(input_ids=window[None], use_cache=False)
            experts.append(torch.stack([c[0] for c in captured], dim=1).to(torch.int16))
            weights.append(torch.stack([c[1] for c in captured], dim=1).float())
    finally:
        for handle in handles:
            handle.remove()
    return Trace(
        experts=torch.cat(experts).numpy(),
        weights=torch.cat(weights).numpy(),
        layers=np.array([layer for layer, _ in blocks], dtype=np.int32),
        tokens=ids.numpy().astype(np.int64),
        num_experts=_num_experts(blocks[0][1]),
        domain=domain,
        source=source,
    )


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write `trace` to `path` in the `.npz` format described in this module's docstring."""
    with open(path, "wb") as f:
        np.savez_compressed(
            f,
            experts=trace.experts.astype(np.int16),
            weights=trace.weights.astype(np.float32),
            layers=trace.layers.astype(np.int32),
            tokens=trace.tokens.astype(np.int64),
            num_experts=np.int64(trace.num_experts),
            domain=np.str_(trace.domain),
            source=np.str_(trace.source),
        )


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by `save_trace`."""
    with np.load(path, allow_pickle=False) as data:
        return Trace(
            experts=data["experts"],
            weights=data["weights"],
            layers=data["layers"],
            tokens=data["tokens"],
            num_experts=int(data["num_experts"]),
            domain=str(data["domain"]),
            source=str(data["source"]),
        )
