"""Export an HF safetensors MoE checkpoint to a standard GGUF: tensor names and metadata as llama.cpp's
convert_hf_to_gguf.py writes them, experts stacked per layer, written tensor by tensor to a temporary name."""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import ExpertPagerError
from ..model.architectures import ARCHITECTURES, GGUF_CONFIG_KEYS, GGUF_TOKEN_KEYS, Arch
from ..model.layout import Layout
from ..model.read_layout import read_layout
from ..runtime.dequant import block_of
from ..runtime.gguf_model import gguf_name, permute_qk, tensor_name_map
from ..runtime.hybrid_gguf import Forward, Heads, to_gguf
from ..progress import progress_bar
from .tokenizer_gguf import add_tokenizer

EXPORT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight",
            "ssm_conv1d.weight")  # as convert_hf_to_gguf.py


@dataclass(frozen=True)
class Source:
    """One tensor to write: its GGUF name, shape (numpy order), and where its values come from."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, int, str], ...]  # (file, offset, safetensors dtype), stacked along a new first axis
    permute_heads: tuple[int, int] | None = None  # (heads, kv heads) for llama's q/k
    part_shape: tuple[int, ...] | None = None  # each part's shape as read, when not shape[1:]
    columns: slice | None = None  # gpt-oss: the gate or up half (every other column) of an interleaved gate_up
    transpose: bool = False  # gpt-oss: the last two axes swapped, to llama.cpp's [out, in]
    rows: slice | None = None  # fused [E, 2I, H] gate_up (Qwen3.5 as released): the gate or up half of the rows
    transform: Forward | None = None  # a hybrid model's linear-attention or norm tensor as llama.cpp stores it


def _read(file: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A safetensors tensor as float32."""
    count = int(np.prod(shape))
    if dtype == "F32":
        return np.fromfile(file, np.float32, count, offset=offset).reshape(shape)
    if dtype == "F16":
        return np.fromfile(file, np.float16, count, offset=offset).astype(np.float32).reshape(shape)
    if dtype == "BF16":
        raw = np.fromfile(file, np.uint16, count, offset=offset).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    raise ExpertPagerError(f"{file}: cannot export a {dtype} tensor (float32, float16 and bfloat16 only)")


def _values(src: Source) -> np.ndarray:
    part_shape = src.part_shape or (src.shape[1:] if len(src.parts) > 1 else src.shape)
    arrays = [_read(f, off, dt, part_shape) for f, off, dt in src.parts]
    data = np.stack(arrays) if len(arrays) > 1 else arrays[0]
    if src.columns is not None:
        data = data[..., src.columns]
    if src.rows is not None:
        data = data[..., src.rows, :]
    if src.transform is not None:
        data = src.transform(torch.from_numpy(np.ascontiguousarray(data))).numpy()
    if src.transpose:
        data = data.swapaxes(-1, -2)
    if src.permute_heads is not None:
        data = permute_qk(torch.from_numpy(np.ascontiguousarray(data)), *src.permute_heads).numpy()
    return data


def _encode(data: np.ndarray, qtype: str) -> np.ndarray:
    """float32 values in `qtype`, as the bytes GGUF stores."""
    if qtype == "F32":
        return np.ascontiguousarray(data, dtype=np.float32).view(np.uint8)
    if qtype == "F16":
        return np.ascontiguousarray(data, dtype=np.float16).view(np.uint8)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type a tensor is written in: F32 for 1-D tensors, norms and routers; F16 where rows don't fit `qtype` blocks."""
    if len(shape) <= 1 or name.endswith(KEEP_F32):
        return "F32"
    if shape[-1] % block_of(qtype)[0]:
        return "F16"
    return qtype


def _sources(layout: Layout, arch: Arch) -> Iterator[Source]:
    names = tensor_name_map(arch.gguf_arch, layout.num_layers)
    heads = layout.config.get("num_attention_heads")
    kv_heads = layout.config.get("num_key_value_heads", heads)
    linear = Heads.of(layout.config) if arch.hybrid else None
    for t in layout.resident:
        hf_name = t.name.replace("model.language_model.", "model.", 1)  # a multimodal wrapper's text model
        forward = to_gguf(arch, linear, names, hf_name) if linear is not None else None
        if forward is not None:
            meta = torch.empty(t.shape, device="meta")
            for name, fn in forward:
                yield Source(name, tuple(fn(meta).shape), ((t.file, t.offset, t.dtype),), part_shape=t.shape,
                             transform=fn)
            continue
        name = gguf_name(names, hf_name)
        if name is None:
            raise ExpertPagerError(f"{layout.path}: no GGUF name for tensor {t.name!r} of {arch.model_type}")
        permute = None
        if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            permute = (heads, heads if "attn_q" in name else kv_heads)
        yield Source(name, t.shape, ((t.file, t.offset, t.dtype),), permute)
    for layer in layout.moe_layers:
        first = layout.slices[(layer, 0)]
        for p in first.parts:
            base = p.role.removesuffix("_bias")
            suffix = "bias" if base != p.role else "weight"
            if base not in ("gate", "up", "down", "gate_up") or (suffix == "bias" and not arch.expert_bias):
                raise ExpertPagerError(f"{layout.path}: cannot export expert tensors of role {p.role!r}")
            parts = tuple((q.file, q.offset, q.dtype) for e in range(layout.num_experts)
                          for q in [layout.slices[(layer, e)].part(p.role)])
            # gpt-oss as llama.cpp writes it: gate_up de-interleaved into gate and up, weights as [out, in];
            # a fused [2I, H] gate_up (Qwen3.5) split into its gate and up rows
            transpose = arch.fused_transposed and suffix == "weight"
            halves = [(base, None, None)]
            if base == "gate_up" and arch.fused_transposed:
                halves = [("gate", slice(0, None, 2), None), ("up", slice(1, None, 2), None)]
            elif base == "gate_up":
                half = p.shape[0] // 2
                halves = [("gate", None, slice(0, half)), ("up", None, slice(half, None))]
            for role, columns, rows in halves:
                shape = [layout.num_experts, *p.shape]
                shape[-1] //= 2 if columns else 1
                shape[-2] //= 2 if rows else 1
                if transpose:
                    shape[-2:] = shape[:-3:-1]
                yield Source(f"blk.{layer}.ffn_{role}_exps.{suffix}", tuple(shape), parts, None, p.shape, columns,
                             transpose, rows)


def _mla_metadata(w: gguf.GGUFWriter, config) -> None:
    """deepseek2's attention as llama.cpp's DeepseekV2Model writes it: MLA as MQA over the latent (one kv head,
    key/value lengths of kv_lora_rank + rope dims and kv_lora_rank), the per-head lengths as *_mla; gating func."""
    w.add_head_count_kv(1)
    w.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    w.add_value_length(config.kv_lora_rank)
    w.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    sigmoid = config.model_type == "deepseek_v3"  # transformers' v3 router is sigmoid, v2's softmax
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "yarn" and rope.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _hybrid_metadata(w: gguf.GGUFWriter, layout: Layout, arch: Arch, config) -> None:
    """The linear-attention layout as llama.cpp's Qwen3NextModel writes it, beyond the ssm.* keys of HYBRID_CONFIG:
    value width, which layers are recurrent, the rotary dimensions and (Qwen3.5) the mrope sections, padded to 4."""
    w.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    w.add_array(f"{arch.gguf_arch}.attention.recurrent_layers", [t == "linear_attention" for t in config.layer_types])
    w.add_full_attention_interval(layout.config.get("full_attention_interval", 4))
    rope = config.rope_parameters or {}
    w.add_rope_dimension_count(int(config.head_dim * rope.get("partial_rotary_factor", 0.25)))
    if arch.hybrid == "tiled_v":
        sections = list(rope.get("mrope_section") or [11, 11, 10])
        w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


def _metadata(w: gguf.GGUFWriter, layout: Layout, arch: Arch, qtype: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(layout.path).get_text_config()  # attributes resolve aliases (num_experts ->
    # num_local_experts); a multimodal wrapper's text model
    prefix = arch.gguf_arch + "."
    w.add_name(Path(layout.path).name)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    mla_keys = ("attention.head_count_kv", "attention.key_length")  # written by _mla_metadata
    for key, hf_key in {**GGUF_CONFIG_KEYS, **arch.gguf_config}.items():
        value = getattr(config, hf_key, None)
        if arch.mla and key in mla_keys:
            continue
        if key == "expert_weights_scale" and isinstance(value, int):
            value = float(value)
        if isinstance(value, bool):
            w.add_bool(prefix + key, value)
        elif isinstance(value, int):
            w.add_uint32(prefix + key, value)
        elif isinstance(value, float):
            w.add_float32(prefix + key, value)
    if arch.mla:
        _mla_metadata(w, config)
    elif isinstance(getattr(config, "head_dim", None), int):
        w.add_value_length(config.head_dim)
    if arch.hybrid:
        _hybrid_metadata(w, layout, arch, config)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", "default") != "default":
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_vocab_size(config.vocab_size)
    if not add_tokenizer(w, Path(layout.path), config.vocab_size):
        for key, hf_key in GGUF_TOKEN_KEYS.items():
            if isinstance(getattr(config, hf_key, None), int):
                w.add_uint32(key, getattr(config, hf_key))


def export_gguf(model_ref: str | Path, out: str | Path, out_type: str = "f32", progress: bool = True) -> Path:
    """Write `model_ref` (an HF safetensors MoE checkpoint) as one GGUF file `out`; returns its path."""
    qtype = EXPORT_TYPES.get(out_type.lower())
    if qtype is None:
        raise ExpertPagerError(f"unknown export type {out_type!r}; use one of {', '.join(EXPORT_TYPES)}")
    layout = read_layout(model_ref)
    if layout.format != "safetensors":
        raise ExpertPagerError(f"{layout.path}: export reads HF safetensors checkpoints, not {layout.format}")
    arch = ARCHITECTURES[layout.architecture]
    if not arch.gguf_config:
        raise ExpertPagerError(f"{layout.path}: exporting {arch.model_type} to GGUF is not supported")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    sources = list(_sources(layout, arch))
    w = gguf.GGUFWriter(None, arch.gguf_arch)
    try:
        _metadata(w, layout, arch, qtype)
        types = [tensor_type(s.name, s.shape, qtype) for s in sources]
        for s, t in zip(sources, types):
            q = gguf.GGMLQuantizationType[t]
            byte_shape = gguf.quants.quant_shape_to_byte_shape(s.shape, q)
            w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with progress_bar(f"export {out.name}", len(sources), progress) as advance:
            for s, t in zip(sources, types):
                w.write_tensor_data(_encode(_values(s), t))
                advance()
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out
