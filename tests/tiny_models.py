"""Tiny random checkpoints of every supported HF MoE architecture, saved with transformers' save_pretrained."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, mlp_only_layers=[1]),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                        num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                        num_key_value_heads=4),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(model_type: str, **overrides):
    """A transformers config of `model_type` with tiny sizes."""
    return AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **overrides})


def save_tiny(model_type: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Build a random tiny model of `model_type`, save it to `folder`, return the folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 1 and p.numel() > 1:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # deepseek_v3's routing bias, zeros at init
                b.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder
