"""LoRA arithmetic exactly as peft computes it, so a paged model with an adapter equals peft's own forward.

Resident linears (peft's lora.Linear): result = base(x); result = result + B(A(x in the factors' dtype)) * scaling;
back to the base output's dtype. peft holds these factors in float32 (it upcasts bfloat16/float16 adapters).
Experts (peft's ParamWrapper on gate_up_proj / down_proj, one adapter): the weight is merged before the experts
multiply, W' = baddbmm(W, lhs, rhs, alpha=scaling) with lhs = B [out, rank], rhs = A [rank, in] (lhs = A^T,
rhs = B^T for a transposed module), in the weight's dtype; one expert at a time here, in the batch layout peft's
baddbmm gives each expert, written where peft's fresh merged tensor holds it modulo ALIGN."""

from collections.abc import Callable

import torch
from torch import nn

from .matrices import at_offset


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool,
                  offset: int) -> torch.Tensor:
    """One expert's weight with its LoRA merged, as peft's ParamWrapper merges it, in a new tensor at `offset`
    modulo ALIGN (`weight` is left as it is: it may be a cache slot)."""
    out = at_offset(weight, offset, copy=True)
    lhs, rhs = (a.T, b) if transposed else (b, a)
    out.unsqueeze(0).baddbmm_(lhs.unsqueeze(0), rhs.unsqueeze(0), alpha=scaling)
    return out


class LinearLora:
    """A forward hook on a resident nn.Linear that adds the active adapter's LoRA, as peft's lora.Linear does.
    `loras[name]` = (A [r, in], B [out, r], scaling); `active()` names the adapter in use (None: none)."""

    def __init__(self, active: Callable[[], str | None]):
        self.active = active
        self.loras: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def __call__(self, module: nn.Module, args: tuple, result: torch.Tensor) -> torch.Tensor:
        lora = self.loras.get(self.active())
        if lora is None:
            return result
        a, b, scaling = lora
        x = args[0]
        dtype = result.dtype
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        result = result + nn.functional.linear(nn.functional.linear(x, a), b) * scaling
        return result.to(dtype)
