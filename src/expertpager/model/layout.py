"""What a checkpoint is: resident tensors and, per (layer, expert), the byte ranges that build that expert."""

from dataclasses import dataclass, field

from .tensors import TensorInfo

SliceKey = tuple[int, int]
"""(layer, expert): the unit of paging."""


@dataclass(frozen=True)
class TensorPart:
    """One tensor (or one expert's share of a stacked tensor) that builds an expert slice.

    role: gate, up, down, gate_up (fused), gate_up_bias, down_bias, and for MXFP4 the suffixes _blocks/_scales.
    dtype: a safetensors dtype ("BF16", "F32", "U8", ...) or a GGML type name ("Q4_K", "F16", ...).
    shape: the logical shape of this expert's tensor in transformers' orientation as stored in the file.
    stacked: the part is one expert's share of a tensor that holds all experts of the layer (transformers may then
    use the file's bytes in place, at the file's alignment, rather than a copy).
    """

    role: str
    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    stacked: bool = False


@dataclass(frozen=True)
class ExpertSlice:
    """Every byte range one expert of one layer needs; `parts` are sorted by (file, offset)."""

    layer: int
    expert: int
    parts: tuple[TensorPart, ...]

    @property
    def key(self) -> SliceKey:
        return (self.layer, self.expert)

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.parts)

    def part(self, role: str) -> TensorPart:
        for p in self.parts:
            if p.role == role:
                return p
        raise KeyError(role)


@dataclass(frozen=True)
class ResidentTensor(TensorInfo):
    """A tensor that stays in memory; category is one of embeddings, attention, router, norm,
    shared_expert, dense_mlp, lm_head, other."""

    category: str = "other"


@dataclass
class Layout:
    """A checkpoint's layout, built from headers only."""

    format: str  # "safetensors", "gguf" or "repacked"
    architecture: str  # HF model_type, or the GGUF general.architecture
    path: str  # the folder or first .gguf file
    files: list[str]
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    experts_per_token: int
    slices: dict[SliceKey, ExpertSlice]
    resident: list[ResidentTensor]
    config: dict = field(default_factory=dict)
    source_format: str = ""  # repacked: the format its resident tensors and config keep ("gguf" or "safetensors")
    checksums: dict[SliceKey, str] = field(default_factory=dict)  # repacked: SHA-256 of each slice's bytes
    quantize: str | None = None  # repacked: the `repack --quantize` its slices were stored with ("int4"/"int8")

    @property
    def weights_format(self) -> str:
        """How the config and resident tensors are stored: "gguf" or "safetensors"."""
        return self.source_format or self.format

    @property
    def expert_bytes(self) -> int:
        return sum(s.nbytes for s in self.slices.values())

    @property
    def resident_bytes(self) -> int:
        return sum(t.length for t in self.resident)

    @property
    def slice_bytes(self) -> int:
        """The largest slice: what one cache slot must hold."""
        return max(s.nbytes for s in self.slices.values())

    def resident_by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.resident:
            out[t.category] = out.get(t.category, 0) + t.length
        return out
