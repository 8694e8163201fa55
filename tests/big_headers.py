"""Header-only checkpoints of real size (Qwen3-30B-A3B geometry): sparse files whose tensor data is a hole."""

import json
import struct
from pathlib import Path

import gguf
import numpy as np

QWEN3_30B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                 moe_intermediate_size=768, intermediate_size=6144, tie_word_embeddings=False)


def qwen3_30b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    c = QWEN3_30B
    h, hd, f, e = c["hidden_size"], c["head_dim"], c["moe_intermediate_size"], c["num_experts"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h)), ("lm_head.weight", (c["vocab_size"], h)),
           ("model.norm.weight", (h,))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (c["num_attention_heads"] * hd, h)),
                (p + "self_attn.k_proj.weight", (c["num_key_value_heads"] * hd, h)),
                (p + "self_attn.v_proj.weight", (c["num_key_value_heads"] * hd, h)),
                (p + "self_attn.o_proj.weight", (h, c["num_attention_heads"] * hd)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate.weight", (e, h))]
        for x in range(e):
            out += [(p + f"mlp.experts.{x}.gate_proj.weight", (f, h)), (p + f"mlp.experts.{x}.up_proj.weight", (f, h)),
                    (p + f"mlp.experts.{x}.down_proj.weight", (h, f))]
    return out


def write_sparse_safetensors(folder: Path) -> Path:
    """A bf16 Qwen3-30B-A3B-shaped checkpoint: real header, data region left as a hole (about 61 GB, sparse)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(QWEN3_30B))
    path = folder / "model.safetensors"
    _write_sparse(path, qwen3_30b_tensors())
    return path


def write_sparse_gguf(path: Path) -> Path:
    """A Q4_K_M-like Qwen3-30B-A3B GGUF (gate/up Q4_K, down Q6_K in even layers else Q4_K); data region a hole."""
    c = QWEN3_30B
    Q = gguf.GGMLQuantizationType
    h, f, e, L = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(L)
    w.add_embedding_length(h)
    w.add_expert_count(e)
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_feed_forward_length(f)
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])

    def info(name: str, shape: tuple[int, ...], q: "gguf.GGMLQuantizationType") -> None:
        block, size = gguf.GGML_QUANT_SIZES[q]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q)

    info("token_embd.weight", (c["vocab_size"], h), Q.Q4_K)
    info("output.weight", (c["vocab_size"], h), Q.Q6_K)
    info("output_norm.weight", (h,), Q.F32)
    for i in range(L):
        info(f"blk.{i}.attn_q.weight", (4096, h), Q.Q4_K)
        info(f"blk.{i}.attn_k.weight", (512, h), Q.Q4_K)
        info(f"blk.{i}.attn_v.weight", (512, h), Q.Q6_K)
        info(f"blk.{i}.attn_output.weight", (h, 4096), Q.Q4_K)
        info(f"blk.{i}.attn_norm.weight", (h,), Q.F32)
        info(f"blk.{i}.ffn_norm.weight", (h,), Q.F32)
        info(f"blk.{i}.ffn_gate_inp.weight", (e, h), Q.F32)
        info(f"blk.{i}.ffn_gate_exps.weight", (e, f, h), Q.Q4_K)
        info(f"blk.{i}.ffn_up_exps.weight", (e, f, h), Q.Q4_K)
        info(f"blk.{i}.ffn_down_exps.weight", (e, h, f), Q.Q6_K if i % 2 == 0 else Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    total = sum(ti.nbytes + (-ti.nbytes % 32) for ti in w.tensors[0].values())
    with open(path, "r+b") as fh:
        fh.seek(0, 2)
        start = fh.tell()
        fh.truncate(start + (-start % 32) + total)
    return path


REAL_CONFIGS = Path(__file__).parent / "data" / "configs"


def real_tensors(config_file: Path, fused: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of the released checkpoint whose config.json is `config_file`, from transformers' model built on
    the meta device (no memory): names as released (a multimodal wrapper's under `model.language_model.`), experts
    fused per layer or one 2D tensor per expert, plus an MTP layer with its own experts and, for a wrapper, a
    vision tensor (neither is part of the text model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_file.read_text())).get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    wrapped = config.model_type != json.loads(config_file.read_text())["model_type"]
    out = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if not fused and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            base = name.rpartition(".")[0]
            roles = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            rows = shape[1] // len(roles)
            out += [(f"{base}.{e}.{role}.weight", (rows, shape[2])) for e in range(shape[0]) for role in roles]
            continue
        if wrapped and name.startswith("model."):
            name = name.replace("model.", "model.language_model.", 1)
        out.append((name, shape))
    h, f = config.hidden_size, config.moe_intermediate_size
    out += [(f"mtp.layers.0.mlp.experts.{e}.{role}.weight", (h, f) if role == "down_proj" else (f, h))
            for e in range(config.num_experts) for role in ("gate_proj", "up_proj", "down_proj")]
    out.append(("mtp.fc.weight", (h, 2 * h)))
    if wrapped:
        out.append(("model.visual.patch_embed.proj.weight", (1152, 3, 2, 16, 16)))
    return out


def write_sparse_real(folder: Path, config_file: Path, fused: bool) -> Path:
    """A bf16 checkpoint of a released model's real geometry (`real_tensors`): its config.json, a real header,
    the data region a hole. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config_file.read_text())
    _write_sparse(folder / "model.safetensors", real_tensors(config_file, fused))
    return folder


def _write_sparse(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    header, pos = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)
