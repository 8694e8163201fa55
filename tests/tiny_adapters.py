"""Tiny PEFT LoRA adapters for the tiny checkpoints: made by peft itself (target_modules + target_parameters), or
written in the older per-expert layout (one LoRA per expert Linear, as adapters trained on transformers 4 are)."""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def save_peft_adapter(model_folder: Path, out: Path, seed: int = 1, target_modules=("q_proj", "v_proj"),
                      target_parameters=EXPERT_PARAMS, **config) -> Path:
    """A LoRA made by peft's get_peft_model on the model in `model_folder`, with random (non-zero) A and B."""
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    torch.manual_seed(seed)
    lora = LoraConfig(**{"r": 4, "lora_alpha": 8, **config}, target_modules=list(target_modules),
                      target_parameters=list(target_parameters), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def save_per_expert_adapter(model_folder: Path, out: Path, block: str = "mlp", names=("gate_proj", "up_proj", "down_proj"),
                            r: int = 4, alpha: int = 16, seed: int = 3, **config) -> Path:
    """An older LoRA with one A/B pair per expert projection (keys ...experts.E.gate_proj.lora_A.weight) and on
    q_proj, written by hand as peft saved them for transformers 4 models."""
    c = AutoModelForCausalLM.from_pretrained(model_folder).config
    hidden = c.hidden_size
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    experts = getattr(c, "num_experts", None) or c.num_local_experts
    q_out = c.num_attention_heads * (getattr(c, "head_dim", None) or hidden // c.num_attention_heads)
    torch.manual_seed(seed)
    tensors = {}
    for layer in range(c.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}"
        for e in range(experts):
            for name, (n_in, n_out) in zip(names, [(hidden, inter), (hidden, inter), (inter, hidden)]):
                tensors[f"{prefix}.{block}.experts.{e}.{name}.lora_A.weight"] = torch.randn(r, n_in) * 0.3
                tensors[f"{prefix}.{block}.experts.{e}.{name}.lora_B.weight"] = torch.randn(n_out, r) * 0.3
        tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"] = torch.randn(r, hidden) * 0.3
        tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"] = torch.randn(q_out, r) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [*names, "q_proj"], "lora_dropout": 0.0,
           "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_folder), **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out
