"""The weight matrices of transformers' experts modules, by the slice roles that build them, and the alignment a
cache slot keeps them at."""

MATRICES = {"gate_up": ("gate", "up", "gate_up"), "down": ("down",)}
ALIGN = 64  # bytes: a cache line, the widest vector load; GEMM kernels may round differently at another address
