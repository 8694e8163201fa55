"""Generated qwen3_moe checkpoints with realistic slice sizes and random bf16 weights, for benchmarks and memory tests
(routing of random weights is near uniform: use the demo model's traces for hit-rate claims)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig


def write_synthetic_moe(folder: Path, hidden: int = 1024, moe_intermediate: int = 512, layers: int = 8, experts: int = 48,
                  top_k: int = 4, vocab: int = 1024, seed: int = 0) -> Path:
    """bf16 weights; one shard per layer so the writer never holds more than one layer. Slice = 3*h*f*2 bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=moe_intermediate, num_hidden_layers=layers,
                            num_experts=experts, num_experts_per_tok=top_k, vocab_size=vocab, head_dim=64,
                            num_attention_heads=hidden // 64, num_key_value_heads=4, intermediate_size=2 * moe_intermediate,
                            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, dtype=torch.bfloat16)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("base.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    heads, kv = hidden // 64, 4
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(heads * 64, hidden), p + "self_attn.k_proj.weight": rand(kv * 64, hidden),
             p + "self_attn.v_proj.weight": rand(kv * 64, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * 64),
             p + "self_attn.q_norm.weight": torch.ones(64, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(64, dtype=torch.bfloat16),
             p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rand(experts, hidden)}
        for e in range(experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rand(moe_intermediate, hidden)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rand(moe_intermediate, hidden)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rand(hidden, moe_intermediate)
        shard(f"layer-{i:03d}.safetensors", t)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
