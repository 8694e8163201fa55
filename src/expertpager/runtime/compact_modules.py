"""Resident weights of a quantized GGUF in the compact tier: linear layers held as the compact experts' int4/int8
layouts, the token embedding as its GGUF blocks (each looked-up row dequantized), so resident RAM is about the
file's resident bytes. Activations as compact.compact_matmul multiplies them (int8 per 32 with the native kernels;
else bfloat16, int8 per row into an int8 lm_head)."""

import torch
from torch import nn

from .compact import compact_project, pack_matrix, packs_as_int4
from .dequant import dequantize
from .paged_experts import DTYPE_NAMES


class CompactLinear(nn.Module):
    """y = x W^T (+ b) with W packed (int4 groups of 32 or int8 rows, see packs_as_int4 and its `requantize`); W's
    bytes are buffers, so state_dict counts them. `int8_activations` (the lm_head): without the native kernels, int8
    rows multiply x quantized to int8 per row (compact.int8_matmul)."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, int], bias: torch.Tensor | None = None,
                 requantize: bool = False, int8_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = shape
        self.int8_activations = int8_activations
        for suffix, t in pack_matrix([(raw, qtype, shape)], packs_as_int4(qtype, shape, requantize)).items():
            self.register_buffer("weight" + suffix, t)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = compact_project(x.reshape(-1, self.in_features).to(torch.bfloat16), self._buffers, "weight",
                            self.int8_activations)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, int4: bool = False) -> int:
    """Replace each float linear layer of `model` but routers and gates (names ending in gate or router, or under
    one; fewer than 16 outputs) by a CompactLinear, one at a time (`--quantize` on a float checkpoint): int8 rows,
    or with `int4` (`--quantize int4`) int4 groups where the shape allows. Returns the bytes the weights shrank by."""
    saved, output = 0, model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.out_features < 16 or any(
                part.endswith(("gate", "router")) for part in name.split(".")):
            continue
        w = module.weight.detach().contiguous()
        new = CompactLinear(w.view(torch.uint8).reshape(-1), DTYPE_NAMES[w.dtype], tuple(w.shape),
                            None if module.bias is None else module.bias.detach(), int4, module is output)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        saved += w.nbytes - sum(b.nbytes for b in new.buffers() if b is not None) + (0 if module.bias is None else module.bias.nbytes)
    return saved


class BlockEmbedding(nn.Module):
    """A token embedding kept as its GGUF rows of quantized blocks; a lookup dequantizes just the rows it gathers."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, int]):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.qtype = qtype
        self.register_buffer("blocks", raw.reshape(self.num_embeddings, -1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype} blocks"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[ids.reshape(-1)]
        values = dequantize(rows.reshape(-1), self.qtype, (rows.shape[0], self.embedding_dim))
        return values.to(torch.bfloat16).view(*ids.shape, self.embedding_dim)
