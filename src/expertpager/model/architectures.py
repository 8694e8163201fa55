"""Architectures as data: which config keys give the MoE geometry, how tensors are named, what each tensor is.

One table for HF safetensors checkpoints and GGUF files; nothing here is a class per model.
"""

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arch:
    """Flags the runtime and layout need beyond tensor names."""

    model_type: str  # transformers config model_type
    gguf_arch: str  # GGUF general.architecture
    shared_experts: bool = False
    expert_bias: bool = False  # gpt-oss: experts carry biases
    fused_transposed: bool = False  # gpt-oss: gate_up stored [H, 2I], interleaved gate/up columns
    gguf_config: dict[str, str] = field(default_factory=dict)  # GGUF key after "<arch>." -> config key, beyond
    # GGUF_CONFIG_KEYS; empty: running this arch from GGUF is not supported
    gguf_defaults: dict = field(default_factory=dict)  # config values llama.cpp implies but does not store
    permute_qk: bool = False  # llama.cpp's llama converter permutes q/k rows for its rope layout
    gguf_match: dict = field(default_factory=dict)  # GGUF metadata (key after "<arch>.") that picks this entry
    # among those sharing a gguf_arch; an entry without it is the fallback
    mla: bool = False  # deepseek's multi-head latent attention: llama.cpp's MQA-style key/value lengths
    text_model_type: str = ""  # a multimodal wrapper (its config holds the text model's in `text_config`): the
    # text model's model_type, which transformers builds for a causal LM
    hybrid: str = ""  # Gated DeltaNet (linear attention) layers between full-attention ones, as llama.cpp stores
    # them (runtime/hybrid_gguf.py): "qkvz" (Qwen3-Next's fused in_proj_qkvz), "tiled_v" (Qwen3.5's value heads)
    ignore: str = ""  # regex of tensors in the checkpoint that are not part of the text model (vision tower, MTP)

    @property
    def config_type(self) -> str:
        """The model_type transformers builds the causal LM from."""
        return self.text_model_type or self.model_type


DEEPSEEK2_CONFIG = {
    "expert_count": "n_routed_experts", "expert_feed_forward_length": "moe_intermediate_size",
    "leading_dense_block_count": "first_k_dense_replace", "expert_shared_count": "n_shared_experts",
    "expert_weights_scale": "routed_scaling_factor", "expert_weights_norm": "norm_topk_prob",
    "expert_group_count": "n_group", "expert_group_used_count": "topk_group", "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank", "rope.dimension_count": "qk_rope_head_dim",
    "attention.value_length_mla": "v_head_dim",
}
HYBRID_CONFIG = {
    "expert_count": "num_experts", "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size", "ssm.conv_kernel": "linear_conv_kernel_dim",
    "ssm.state_size": "linear_key_head_dim", "ssm.group_count": "linear_num_key_heads",
    "ssm.time_step_rank": "linear_num_value_heads",
}
"""GGUF keys of the hybrid archs; linear_value_head_dim, layer_types and the partial rotary factor are derived
(gguf_config.hybrid_config)."""
_ARCHES = (
    Arch("qwen3_moe", "qwen3moe", gguf_config={"expert_count": "num_experts",
                                               "expert_feed_forward_length": "moe_intermediate_size",
                                               "expert_weights_norm": "norm_topk_prob"},
         gguf_defaults={"norm_topk_prob": True}),
    Arch("qwen2_moe", "qwen2moe", shared_experts=True,
         gguf_config={"expert_count": "num_experts", "expert_feed_forward_length": "moe_intermediate_size",
                      "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}),
    Arch("mixtral", "llama", gguf_config={"expert_count": "num_local_experts"}, permute_qk=True),
    Arch("olmoe", "olmoe", gguf_config={"expert_count": "num_experts"}),
    Arch("deepseek_v2", "deepseek2", shared_experts=True, mla=True, gguf_config=DEEPSEEK2_CONFIG,
         gguf_defaults={"q_lora_rank": None}),
    Arch("deepseek_v3", "deepseek2", shared_experts=True, mla=True, gguf_config=DEEPSEEK2_CONFIG,
         gguf_defaults={"q_lora_rank": None}, gguf_match={"expert_gating_func": 2}),  # sigmoid gating
    Arch("gpt_oss", "gpt-oss", expert_bias=True, fused_transposed=True,
         gguf_config={"expert_count": "num_local_experts", "expert_feed_forward_length": "intermediate_size",
                      "attention.sliding_window": "sliding_window"},
         gguf_defaults={"rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}}),
    Arch("granitemoe", "granitemoe"),
    Arch("qwen3_5_moe", "qwen35moe", shared_experts=True, text_model_type="qwen3_5_moe_text", hybrid="tiled_v",
         gguf_config=HYBRID_CONFIG, ignore=r"^(model\.)?(mtp|visual)\."),
    Arch("qwen3_next", "qwen3next", shared_experts=True, hybrid="qkvz", gguf_config=HYBRID_CONFIG,
         gguf_defaults={"norm_topk_prob": True}, ignore=r"^(model\.)?mtp\."),
)
ARCHITECTURES: dict[str, Arch] = {
    **{a.model_type: a for a in _ARCHES},
    **{a.text_model_type: a for a in _ARCHES if a.text_model_type},  # a text model saved on its own
}
GGUF_ARCHITECTURES = {"qwen3moe", "qwen2moe", "llama", "olmoe", "deepseek2", "gpt-oss", "granitemoe", "qwen35moe",
                      "qwen3next"}
GGUF_RUNNABLE: dict[str, list[Arch]] = {}
"""GGUF architectures the runtime can build a transformers model for (llama means Mixtral: llama with experts),
each with its entries, those with a `gguf_match` first."""
for _a in sorted(_ARCHES, key=lambda a: not a.gguf_match):
    if _a.gguf_config:
        GGUF_RUNNABLE.setdefault(_a.gguf_arch, []).append(_a)

# GGUF metadata key (after "<arch>.") -> transformers config key, for every runnable arch.
GGUF_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "expert_used_count": "num_experts_per_tok",
}
# GGUF rope scaling key (after "<arch>.") -> key of transformers' rope_parameters.
GGUF_ROPE_KEYS = {"rope.freq_base": "rope_theta", "rope.scaling.type": "rope_type", "rope.scaling.factor": "factor",
                  "rope.scaling.original_context_length": "original_max_position_embeddings"}
GGUF_TOKEN_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
                   "tokenizer.ggml.padding_token_id": "pad_token_id"}

# Config keys, first present wins.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk")

# Expert tensors. Each rule: regex with groups (layer, [expert,] name[, suffix]); `stacked` means the tensor
# holds all experts of the layer along its first (slowest) dimension.
ROLE_NAMES = {
    "gate_proj": "gate", "w1": "gate", "gate": "gate",
    "up_proj": "up", "w3": "up", "up": "up",
    "down_proj": "down", "w2": "down", "down": "down",
    "gate_up_proj": "gate_up", "gate_up": "gate_up", "input_linear": "gate_up", "output_linear": "down",
}
SUFFIX_NAMES = {None: "", "weight": "", "bias": "_bias", "_bias": "_bias", "_blocks": "_blocks", "_scales": "_scales"}


@dataclass(frozen=True)
class ExpertRule:
    pattern: re.Pattern
    stacked: bool


EXPERT_RULES = (
    # HF per-expert 2D tensors: qwen2/3_moe, olmoe, deepseek (mlp.experts.E.gate_proj), mixtral (w1/w3/w2)
    ExpertRule(re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"), False),
    # HF stacked: gpt-oss (mlp.experts.gate_up_proj[_bias|_blocks|_scales]), granitemoe (input/output_linear)
    ExpertRule(re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$"), True),
    ExpertRule(re.compile(r"layers\.(\d+)\.block_sparse_moe\.(input_linear|output_linear)\.(weight)$"), True),
    # GGUF stacked: blk.N.ffn_{gate,up,down,gate_up}_exps.{weight,bias}
    ExpertRule(re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$"), True),
)

# Resident tensors by name, first match wins.
RESIDENT_CATEGORIES = (
    (re.compile(r"embed_tokens|token_embd|\bwte\b"), "embeddings"),
    (re.compile(r"lm_head|^output\.weight$"), "lm_head"),
    (re.compile(r"shared_expert|shexp"), "shared_expert"),
    (re.compile(r"\.mlp\.gate\.|\.gate\.weight$|router|ffn_gate_inp|e_score_correction|exp_probs_b"), "router"),
    (re.compile(r"norm"), "norm"),
    (re.compile(r"self_attn|attn_|\.attention\.|sinks|linear_attn|ssm_"), "attention"),
    (re.compile(r"\.mlp\.(gate|up|down)_proj|ffn_(gate|up|down)\.|\.mlp\.|\.ffn_"), "dense_mlp"),
)


def match_expert(name: str) -> tuple[int, int | None, str] | None:
    """(layer, expert or None if stacked, role) for an expert tensor name, else None."""
    for rule in EXPERT_RULES:
        m = rule.pattern.search(name)
        if m:
            groups = m.groups()
            if rule.stacked:
                layer, base, suffix = int(groups[0]), groups[1], groups[2]
                return layer, None, ROLE_NAMES[base] + SUFFIX_NAMES[suffix]
            return int(groups[0]), int(groups[1]), ROLE_NAMES[groups[2]]
    return None


def resident_category(name: str) -> str:
    for pattern, category in RESIDENT_CATEGORIES:
        if pattern.search(name):
            return category
    return "other"
