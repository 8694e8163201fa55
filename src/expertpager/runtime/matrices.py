"""The weight matrices of transformers' experts modules, by the slice roles that build them, and the alignment a
cache slot keeps them at."""

MATRICES = {"gate_up": ("gate", "up", "gate_up"), "down": ("down",)}
ALIGN = 64  # bytes: a cache line, the widest vector load; GEMM kernels may round differently at another address


def matrix_of(role: str) -> str | None:
    """The matrix a slice part's role builds (gate_up or down), or None (a bias, scales)."""
    return next((m for m, names in MATRICES.items() if role in names), None)
