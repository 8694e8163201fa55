"""Which experts to keep when pruning: statistics collected through the paged runtime (routing counts and REAP's
router-weighted output norms), per-expert scores by method, and the kept experts of each MoE layer.

REAP (router-weighted expert activation pruning): an expert's score is the mean, over the tokens routed to it, of
its gate weight times the L2 norm of its output; experts with the lowest scores are removed."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from ..errors import ExpertPagerError
from ..runtime.paged_experts import PagedExperts
from ..runtime.profiles import Profile

METHODS = ("reap", "frequency", "random")


@dataclass
class ExpertStats:
    """Per MoE layer (rows, decoder layer `layers[m]`) and expert: routed tokens and the sum of gate x |output|."""

    layers: list[int]
    counts: np.ndarray  # int64 [M, E]
    reap_sums: np.ndarray  # float64 [M, E]
    tokens: int

    @property
    def reap(self) -> np.ndarray:
        """REAP scores [M, E]: mean gate weight x output norm over the tokens routed to each expert (0 if none)."""
        return np.divide(self.reap_sums, self.counts, out=np.zeros_like(self.reap_sums), where=self.counts > 0)


@torch.inference_mode()
def collect_stats(model: PreTrainedModel, token_ids: list[int], window: int = 256,
                  on_window: Callable[[], None] | None = None) -> ExpertStats:
    """Run a paged `model` over `token_ids` in independent windows and gather every expert's routing count and
    REAP sum from the paged experts' outputs (the model's experts need not fit in memory)."""
    modules = sorted((m for m in model.modules() if isinstance(m, PagedExperts)), key=lambda m: m.layer)
    if not modules:
        raise ExpertPagerError("collecting pruning statistics needs a model loaded with paged experts")
    row = {m.layer: i for i, m in enumerate(modules)}
    experts = modules[0].num_experts
    counts = torch.zeros(len(modules), experts, dtype=torch.int64)
    sums = torch.zeros(len(modules), experts, dtype=torch.float64)

    def on_output(layer: int, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        counts[row[layer]] += torch.bincount(ids, minlength=experts)
        sums[row[layer]].index_add_(0, ids, (weights.double() * out.double().norm(dim=-1)))

    for m in modules:
        m.on_output = on_output
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    try:
        for start in range(0, ids.numel(), window):
            model(input_ids=ids[start:start + window][None], use_cache=False)
            if on_window is not None:
                on_window()
    finally:
        for m in modules:
            m.on_output = None
    return ExpertStats([m.layer for m in modules], counts.numpy(), sums.numpy(), int(ids.numel()))


def expert_scores(stats: ExpertStats | None, method: str, layers: list[int], num_experts: int, seed: int = 0,
                  profile: Profile | None = None) -> np.ndarray:
    """Scores [M, E], higher kept first: REAP, routing frequency, or seeded uniform noise (random, no statistics).
    With a domain `profile`, each score is multiplied by the share of the profile's tokens routed to the expert, so
    the experts that domain does not use go first."""
    check_method(method)
    if method == "random":
        scores = np.random.default_rng(seed).random((len(layers), num_experts))
    elif stats is None:
        raise ExpertPagerError(f"--method {method} needs calibration text (--input FILE)")
    else:
        scores = stats.reap if method == "reap" else stats.counts.astype(np.float64)
    if profile is not None:
        if profile.layers != list(layers) or profile.counts.shape != (len(layers), num_experts):
            raise ExpertPagerError(f"profile {profile.name!r} comes from a model with other MoE layers or experts "
                                   f"({len(profile.layers)} x {profile.counts.shape[1]}, this model "
                                   f"{len(layers)} x {num_experts})")
        scores = scores * profile.frequencies
    return scores


def check_method(method: str) -> None:
    """A clear error for a method that is not one of METHODS."""
    if method not in METHODS:
        raise ExpertPagerError(f"unknown pruning method {method!r}: use one of {', '.join(METHODS)}")


def kept_experts(scores: np.ndarray, keep: int) -> list[list[int]]:
    """Per layer, the `keep` highest-scoring experts (ties to the lower id), in ascending id order: new id i is
    the i-th kept expert."""
    return [sorted(np.argsort(-row, kind="stable")[:keep].tolist()) for row in scores]


def parse_keep(text: str, num_experts: int, top_k: int) -> int:
    """Experts to keep per layer from '75%' (of `num_experts`, rounded to nearest) or a count; at least `top_k`
    (the router picks that many) and fewer than `num_experts` (else nothing is pruned)."""
    s = str(text).strip()
    try:
        keep = round(num_experts * float(s[:-1]) / 100) if s.endswith("%") else int(s)
    except (ValueError, OverflowError):
        raise ExpertPagerError(f"--keep must be a percentage such as 75% or a count of experts, got {text!r}") from None
    if keep >= num_experts:
        raise ExpertPagerError(f"--keep {text} keeps {keep} of {num_experts} experts per layer: nothing to prune "
                               f"(keep fewer than {num_experts})")
    if keep < top_k:
        raise ExpertPagerError(f"--keep {text} keeps {keep} experts per layer, fewer than the {top_k} the router "
                               "picks per token")
    return keep
