"""The weight matrices of transformers' experts modules, by the slice roles that build them, and the alignment a
cache slot keeps them at."""

import torch

MATRICES = {"gate_up": ("gate", "up", "gate_up"), "down": ("down",)}
ALIGN = 64  # bytes: a cache line, the widest vector load; GEMM kernels may round differently at another address


def matrix_of(role: str) -> str | None:
    """The matrix a slice part's role builds (gate_up or down), or None (a bias, scales)."""
    return next((m for m, names in MATRICES.items() if role in names), None)


def at_offset(t: torch.Tensor, offset: int, copy: bool = False) -> torch.Tensor:
    """`t` (contiguous), or a copy of it (always with `copy`), at address `offset` modulo ALIGN."""
    if t.data_ptr() % ALIGN == offset and not copy:
        return t
    buf = torch.empty(t.numel() + ALIGN // t.itemsize, dtype=t.dtype)
    skip = (offset - buf.data_ptr()) % ALIGN // t.itemsize
    return buf[skip:skip + t.numel()].view(t.shape).copy_(t)
