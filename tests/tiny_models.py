"""Tiny random checkpoints of every supported HF MoE architecture, saved with transformers' save_pretrained."""

from pathlib import Path

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Gated DeltaNet layers around a full-attention one; two key heads of four value heads (so llama.cpp's value head
# reordering moves rows); rotary over half of the 16-wide heads, its 4 frequencies in mrope sections 2+1+1.
HYBRID = dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_conv_kernel_dim=4,
              linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
WRAPPED = {"qwen3_5_moe"}  # multimodal wrappers: the text settings go in text_config

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
    "qwen3_5_moe": dict(head_dim=16, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                        num_experts_per_tok=2, **HYBRID,
                        rope_parameters={**ROPE, "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
    "qwen3_next": dict(head_dim=16, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, **HYBRID, rope_parameters=ROPE),
}


def tiny_config(model_type: str, **overrides):
    """A transformers config of `model_type` with tiny sizes."""
    settings = {**COMMON, **CONFIGS[model_type], **overrides}
    if model_type in WRAPPED:
        return AutoConfig.for_model(model_type, text_config=settings)
    return AutoConfig.for_model(model_type, **settings)


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


def release_layout(folder: Path, out: Path, fused: bool = True) -> Path:
    """A hybrid tiny model saved by `save_tiny` rewritten as Qwen's released checkpoints are laid out: for
    qwen3_5_moe the text settings in a qwen3_5_moe config's `text_config` and tensor names under
    `model.language_model.`; experts fused per layer (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
    when `fused`; plus vision-tower and multi-token-prediction (MTP) tensors that are not part of the text model."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    wrapped = config["model_type"] == "qwen3_5_moe_text"
    if wrapped:
        config = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                  "tie_word_embeddings": False, "text_config": config,
                  "vision_config": {"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 32}}
    experts = config.get("text_config", config)["num_experts"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    renamed, g = {}, torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        layer = name.split(".")[2] if ".mlp.experts.0." in name else None
        if fused and layer is not None:
            p = f"model.layers.{layer}.mlp.experts."
            stack = lambda role: torch.stack([tensors[f"{p}{e}.{role}.weight"] for e in range(experts)])  # noqa: E731
            renamed[p + "gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
            renamed[p + "down_proj"] = stack("down_proj")
        if fused and ".mlp.experts." in name:
            continue
        renamed[name] = t
        if name.endswith("mlp.experts.0.gate_proj.weight") and layer == "0":  # an MTP layer with its own experts
            for e in range(experts):
                for role in ("gate_proj", "up_proj", "down_proj"):
                    renamed[f"mtp.layers.0.mlp.experts.{e}.{role}.weight"] = torch.randn(tensors[name.replace(
                        "gate_proj", role)].shape, generator=g, dtype=t.dtype)
    renamed["mtp.fc.weight"] = torch.randn(8, 8, generator=g)
    if wrapped:
        renamed = {n.replace("model.", "model.language_model.", 1): t for n, t in renamed.items()}
        renamed["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(48, 16, generator=g)
    save_file({n: t.contiguous() for n, t in renamed.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
