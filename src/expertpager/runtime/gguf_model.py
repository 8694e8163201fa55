"""A transformers model for a GGUF checkpoint: config from metadata, resident tensors dequantized at load (or, in the
compact tier, quantized linears and the embedding kept compact).

Expert tensors are not read here; they stay quantized on disk and are dequantized at use by PagedExperts.
"""

from collections.abc import Callable

import gguf
import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ..errors import ExpertPagerError
from ..progress import progress_bar
from ..model.gguf_config import gguf_arch, hf_config_dict
from ..model.layout import Layout, ResidentTensor
from .compact import is_compact
from .compact_modules import BlockEmbedding, CompactLinear
from .dequant import dequantize, quant_nbytes
from .hybrid_gguf import Heads, from_gguf
from .malloc import returning_freed_memory

FLOAT_TYPES = {"F32", "F16", "BF16"}
FILE_TYPE_DTYPES = {gguf.LlamaFileType.ALL_F32: torch.float32, gguf.LlamaFileType.MOSTLY_F16: torch.float16,
                    gguf.LlamaFileType.MOSTLY_BF16: torch.bfloat16}


def gguf_dtype(layout: Layout, dtype: torch.dtype | str) -> torch.dtype:
    """The compute dtype: as asked, or for "auto" the file's float type (general.file_type), float32 for quantized files."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    return FILE_TYPE_DTYPES.get(layout.config.get("general.file_type"), torch.float32)


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation for its rope layout (convert_hf_to_gguf.py LlamaModel.permute)."""
    n = n_head_kv if n_head_kv is not None and n_head != n_head_kv else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    n = n_head_kv if n_head_kv is not None and n_head != n_head_kv else n_head
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


DENSE_FFN = (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN)


def tensor_name_map(gguf_arch_name: str, num_layers: int) -> gguf.TensorNameMap:
    """gguf-py's HF <-> GGUF tensor name map for an architecture, with a dense layer's FFN (blk.N.ffn_gate/up/down,
    as llama.cpp names them) added where gguf-py's table has none for it (qwen2moe's mlp_only_layers)."""
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch_name)
    names = gguf.get_tensor_name_map(arch, num_layers)
    for tensor in DENSE_FFN:
        if tensor not in gguf.MODEL_TENSORS[arch]:
            for bid in range(num_layers):
                name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
                for key in (name, *gguf.TensorNameMap.block_mappings_cfg[tensor]):
                    names.mapping[key.format(bid=bid)] = (tensor, name)
    return names


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str | None:
    """The GGUF tensor name of an HF parameter name, or None when gguf-py knows no counterpart."""
    base, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):  # a bare parameter (gpt-oss's sinks): llama.cpp names it <name>.weight,
        base, suffix = hf_name, "weight"  # but deepseek's e_score_correction_bias exp_probs_b.bias
        if hf_name.endswith("_bias") and names.get_name(hf_name.removesuffix("_bias")):
            base, suffix = hf_name.removesuffix("_bias"), "bias"
    mapped = names.get_name(base)
    return f"{mapped}.{suffix}" if mapped else None


def read_raw(t: ResidentTensor) -> torch.Tensor:
    """A resident GGUF tensor's stored bytes (uint8)."""
    raw = np.fromfile(t.file, dtype=np.uint8, count=t.length, offset=t.offset)
    if raw.size != t.length:
        raise ExpertPagerError(f"{t.file}: tensor {t.name!r} is truncated")
    return torch.from_numpy(raw)


def read_tensor(t: ResidentTensor) -> torch.Tensor:
    """A resident GGUF tensor's bytes, dequantized to float32 in its stored (numpy-order) shape."""
    return dequantize(read_raw(t), t.dtype, t.shape)


def read_kv_b(tensors: dict[str, ResidentTensor], name: str) -> torch.Tensor | None:
    """deepseek2's kv_b from llama.cpp's newer split attn_k_b ([heads, kv_lora, nope], transposed per head) and
    attn_v_b ([heads, v, kv_lora]), as transformers' [heads * (nope + v), kv_lora]; None when they are absent."""
    k_name, v_name = name.replace("attn_kv_b", "attn_k_b"), name.replace("attn_kv_b", "attn_v_b")
    if not name.endswith("attn_kv_b.weight") or k_name not in tensors or v_name not in tensors:
        return None
    k_b, v_b = read_tensor(tensors[k_name]), read_tensor(tensors[v_name])
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ExpertPagerError(f"{tensors[k_name].file}: {k_name} {list(k_b.shape)} and {v_name} {list(v_b.shape)} "
                               "are not [heads, kv_lora_rank, nope] and [heads, v_head_dim, kv_lora_rank]")
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).flatten(0, 1)


def check_slices(layout: Layout) -> None:
    """Every expert part has a type this runtime dequantizes and exactly the bytes its shape needs in that type."""
    for s in layout.slices.values():
        if is_compact(s):  # stored transcoded by `repack --compact`: checked by its manifest's SHA-256
            continue
        for p in s.parts:
            try:
                need = quant_nbytes(p.dtype, p.shape)
            except ExpertPagerError as e:
                raise ExpertPagerError(f"{p.file}: expert slice {s.key} part {p.role!r}: {e}") from None
            if need != p.length:
                raise ExpertPagerError(f"{p.file}: expert slice {s.key} part {p.role!r} has {p.length} bytes, but a "
                                       f"{p.dtype} tensor of shape {list(p.shape)} has {need}")


def compact_resident(model: PreTrainedModel, layout: Layout, names: gguf.TensorNameMap,
                     tensors: dict[str, ResidentTensor], advance: Callable[[], None] = lambda: None,
                     requantize: bool = False) -> set[str]:
    """Replace each linear layer and token embedding whose GGUF tensor is quantized by its compact module
    (CompactLinear, with `requantize` every type as int4; BlockEmbedding), one tensor read at a time; returns the
    GGUF tensors used. A tied embedding (no output.weight) stays a plain one, as lm_head shares it."""
    arch, config = gguf_arch(layout), model.config
    heads = Heads.of(config.to_dict()) if arch.hybrid else None
    used, output = set(), model.get_output_embeddings()
    for module_name, module in list(model.named_modules()):
        name = gguf_name(names, module_name + ".weight") if isinstance(module, (nn.Linear, nn.Embedding)) else None
        t = tensors.get(name or "")
        if heads is not None and from_gguf(arch, heads, names, module_name + ".weight") is not None:
            continue  # stored transformed (reordered rows or columns): loaded dequantized
        if t is None or t.dtype in FLOAT_TYPES or len(t.shape) != 2 or tuple(t.shape) != tuple(module.weight.shape):
            continue
        if isinstance(module, nn.Embedding):
            if "output.weight" not in tensors:
                continue
            new = BlockEmbedding(read_raw(t), t.dtype, t.shape)
        else:
            raw = read_raw(t).reshape(t.shape[0], -1)
            if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
                kv = config.num_key_value_heads if "attn_k" in name else config.num_attention_heads
                raw = unpermute_qk(raw, config.num_attention_heads, kv).contiguous()
            bias_name = name.removesuffix("weight") + "bias"
            bias = read_tensor(tensors[bias_name]) if module.bias is not None and bias_name in tensors else None
            if (bias is None) != (module.bias is None):
                continue
            new = CompactLinear(raw.reshape(-1), t.dtype, t.shape, bias, requantize, module is output)
            used.add(bias_name)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        used.add(name)
        advance()
    return used


def build_gguf_model(layout: Layout, model_class: type[PreTrainedModel], dtype: torch.dtype | str = "auto",
                     compact: bool = False, progress: bool = False, requantize: bool = False) -> PreTrainedModel:
    """`model_class` (a paged transformers class) built from the GGUF's metadata with its resident weights loaded,
    one tensor at a time; with `compact`, quantized linear layers and the embedding stay compact (see
    compact_resident, `requantize` there) and their full-size parameters are never written (so never resident).
    `progress`: a bar over the resident tensors on stderr."""
    arch = gguf_arch(layout)
    check_slices(layout)
    kwargs = hf_config_dict(layout)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    compute = gguf_dtype(layout, dtype)
    with no_init_weights():
        model = model_class._from_config(config, dtype=compute, experts_implementation="grouped_mm")
    model.tie_weights()  # a GGUF without output.weight shares token_embd with lm_head
    names = tensor_name_map(layout.architecture, layout.num_layers)
    tensors = {t.name: t for t in layout.resident}
    heads = Heads.of(config.to_dict()) if arch.hybrid else None
    used = set()
    with torch.no_grad(), returning_freed_memory(), \
            progress_bar(f"loading {len(tensors)} resident tensors", len(tensors), progress) as advance:
        # parameters, and buffers llama.cpp stores (deepseek's e_score_correction_bias), not rope tables
        buffers = [(n, b) for n, b in model.named_buffers() if gguf_name(names, n)]
        if compact:
            used |= compact_resident(model, layout, names, tensors, advance, requantize)
        for hf_name, param in [*model.named_parameters(), *buffers]:
            name = gguf_name(names, hf_name)
            if name in used:
                continue
            special = from_gguf(arch, heads, names, hf_name) if heads is not None else None
            if special is not None:
                stored, inverse = special
                missing = [n for n in stored if n not in tensors]
                if missing:
                    raise ExpertPagerError(f"{layout.path}: no GGUF tensor {missing[0]} for {hf_name}")
                value = inverse([read_tensor(tensors[n]) for n in stored], param.dtype)
                used.update(stored)
                name = stored[0]
            elif name in tensors:
                value = read_tensor(tensors[name])
                used.add(name)
            elif (value := read_kv_b(tensors, name or "")) is not None:
                used.update({name.replace("attn_kv_b", "attn_k_b"), name.replace("attn_kv_b", "attn_v_b")})
            else:
                raise ExpertPagerError(f"{layout.path}: no GGUF tensor {name or '(unknown name)'} for {hf_name}")
            if value.numel() != param.numel():
                raise ExpertPagerError(f"{layout.path}: tensor {name!r} has shape {list(value.shape)}, but the metadata "
                                       f"gives {hf_name} the shape {list(param.shape)}")
            value = value.reshape(param.shape)
            if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
                kv = config.num_key_value_heads if "attn_k" in name else config.num_attention_heads
                value = unpermute_qk(value, config.num_attention_heads, kv)
            param.copy_(value)
            advance()
    model.tie_weights()
    unused = sorted(set(tensors) - used)
    if unused:
        raise ExpertPagerError(f"{layout.path}: GGUF tensors the {arch.model_type} model has no place for: {', '.join(unused[:5])}")
    return model.eval()
