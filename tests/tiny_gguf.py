"""Tiny GGUF MoE files written with gguf.GGUFWriter, tensor names as llama.cpp's converter writes them."""

from pathlib import Path

import gguf
import numpy as np

H, I, E, K, VOCAB, LAYERS = 64, 32, 4, 2, 80, 4
GGUF_ARCHES = ("qwen3moe", "qwen2moe", "llama", "olmoe", "deepseek2", "gpt-oss")
QUANTS = ("Q4_0", "F16", "BF16", "Q8_0")


def _encode(x: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    q = gguf.GGMLQuantizationType[qtype]
    if q == gguf.GGMLQuantizationType.F32:
        return x.astype(np.float32), None
    if q == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x.astype(np.float32), q), q


def write_tiny_gguf(path: Path, arch: str = "qwen3moe", quants: tuple[str, ...] = QUANTS, fused: bool = False,
                    split_max_tensors: int = 0, seed: int = 0, resident: tuple[str, str] = ("F32", "F32")) -> Path:
    """Write a tiny MoE GGUF of `arch`; layer i's experts use quants[i % len(quants)]; `resident` gives the types of
    the embedding and output, and of the attention matrices. Returns the (first) path."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(2 * I)
    w.add_expert_feed_forward_length(I)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_layer_norm_rms_eps(1e-6)

    def add(name: str, shape: tuple[int, ...], qtype: str = "F32") -> None:
        data, raw = _encode(rng.standard_normal(shape).astype(np.float32) * 0.2, qtype)
        w.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", (VOCAB, H), resident[0])
    add("output_norm.weight", (H,))
    add("output.weight", (VOCAB, H), resident[0])
    dense_first = arch == "deepseek2"
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (H,))
        add(f"blk.{i}.attn_q.weight", (H, H), resident[1])
        add(f"blk.{i}.attn_k.weight", (H // 2, H), resident[1])
        add(f"blk.{i}.attn_v.weight", (H // 2, H), resident[1])
        add(f"blk.{i}.attn_output.weight", (H, H), resident[1])
        add(f"blk.{i}.ffn_norm.weight", (H,))
        if dense_first and i == 0:
            for n, s in (("gate", (2 * I, H)), ("up", (2 * I, H)), ("down", (H, 2 * I))):
                add(f"blk.{i}.ffn_{n}.weight", s)
            continue
        q = quants[i % len(quants)]
        add(f"blk.{i}.ffn_gate_inp.weight", (E, H))
        if fused:
            add(f"blk.{i}.ffn_gate_up_exps.weight", (E, 2 * I, H), q)
        else:
            add(f"blk.{i}.ffn_gate_exps.weight", (E, I, H), q)
            add(f"blk.{i}.ffn_up_exps.weight", (E, I, H), q)
        add(f"blk.{i}.ffn_down_exps.weight", (E, H, I), q)
        if arch == "gpt-oss":
            for n, width in (("gate", I), ("up", I), ("down", H)):
                add(f"blk.{i}.ffn_{n}_exps.bias", (E, width))
            add(f"blk.{i}.attn_sinks.weight", (4,))
        if arch in ("qwen2moe", "deepseek2"):
            for n, s in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                add(f"blk.{i}.ffn_{n}_shexp.weight", s)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path
