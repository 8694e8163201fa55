"""A transformers config for a GGUF checkpoint, built from its metadata and tensor shapes (headers only)."""

from ..errors import ExpertPagerError
from .architectures import GGUF_CONFIG_KEYS, GGUF_ROPE_KEYS, GGUF_RUNNABLE, GGUF_TOKEN_KEYS, Arch
from .layout import Layout
from .plan import linear_attention_layers


def gguf_arch(layout: Layout) -> Arch:
    """The architecture entry that runs this GGUF, or an error naming the runnable ones."""
    arches = GGUF_RUNNABLE.get(layout.architecture)
    if arches is None:
        raise ExpertPagerError(f"{layout.path}: running GGUF architecture {layout.architecture!r} is not supported; "
                               f"runnable: {', '.join(sorted(GGUF_RUNNABLE))}")
    prefix = layout.architecture + "."
    return next(a for a in arches if all(layout.config.get(prefix + k) == v for k, v in a.gguf_match.items()))


def _mla_config(layout: Layout, config: dict) -> None:
    """deepseek2's attention geometry. llama.cpp writes MLA as MQA: head_count_kv 1, key/value lengths of the
    latent (kv_lora_rank + rope dims, kv_lora_rank), the per-head ones as key/value_length_mla; older files have
    only key/value_length, then per head."""
    meta, prefix = layout.config, layout.architecture + "."
    config.pop("head_dim", None)
    config["num_key_value_heads"] = config["num_attention_heads"]  # transformers decompresses MLA to MHA
    rope = config.get("qk_rope_head_dim")
    key = meta.get(prefix + "attention.key_length_mla", meta.get(prefix + "attention.key_length"))
    if "v_head_dim" not in config and prefix + "attention.value_length" in meta:
        config["v_head_dim"] = meta[prefix + "attention.value_length"]
    if rope is None or key is None or "v_head_dim" not in config or "kv_lora_rank" not in config:
        raise ExpertPagerError(f"{layout.path}: deepseek2 GGUF metadata lacks rope.dimension_count, "
                               "attention.kv_lora_rank, attention.key_length or attention.value_length")
    config["qk_nope_head_dim"] = key - rope
    log_mul = meta.get(prefix + "rope.scaling.yarn_log_multiplier")
    if log_mul and config.get("rope_parameters", {}).get("rope_type") == "yarn":  # llama.cpp: 0.1 * mscale_all_dim
        mscale = round(float(log_mul) / 0.1, 6)  # taken as mscale too: equal in DeepSeek-V2 and V3's configs
        config["rope_parameters"].update(mscale=mscale, mscale_all_dim=mscale)
    if config.get("n_group", 1) > 1 and config["model_type"] == "deepseek_v2":
        config["topk_method"] = "group_limited_greedy"


def _hybrid_config(layout: Layout, arch: Arch, config: dict) -> None:
    """The linear-attention settings llama.cpp stores in other terms: value head width from ssm.inner_size, the
    layer pattern from attention.recurrent_layers or full_attention_interval, the rotary fraction from
    rope.dimension_count, and Qwen3.5's interleaved mrope sections from rope.dimension_sections."""
    meta, prefix = layout.config, layout.architecture + "."
    inner, heads = meta.get(prefix + "ssm.inner_size"), config.get("linear_num_value_heads")
    rope_dims, head_dim = meta.get(prefix + "rope.dimension_count"), config.get("head_dim")
    if not inner or not heads or not rope_dims or not head_dim:
        raise ExpertPagerError(f"{layout.path}: {layout.architecture} GGUF metadata lacks ssm.inner_size, "
                               "ssm.time_step_rank, rope.dimension_count or attention.key_length")
    config["linear_value_head_dim"] = inner // heads
    linear = set(linear_attention_layers(layout))
    config["layer_types"] = ["linear_attention" if i in linear else "full_attention" for i in range(layout.num_layers)]
    rope = config.setdefault("rope_parameters", {"rope_type": "default"})
    rope["partial_rotary_factor"] = rope_dims / head_dim
    sections = meta.get(prefix + "rope.dimension_sections")
    if arch.hybrid == "tiled_v" and sections:
        rope.update(mrope_section=list(sections[:3]), mrope_interleaved=True)


def hf_config_dict(layout: Layout) -> dict:
    """Keyword arguments for `AutoConfig.for_model` (model_type included) that describe this GGUF's model."""
    arch = gguf_arch(layout)
    meta, prefix = layout.config, layout.architecture + "."
    config: dict = {"model_type": arch.config_type, **arch.gguf_defaults}
    for key, name in {**GGUF_CONFIG_KEYS, **arch.gguf_config}.items():
        if prefix + key in meta:
            config[name] = meta[prefix + key]
    for key, name in GGUF_TOKEN_KEYS.items():
        if key in meta:
            config[name] = meta[key]
    rope = {"rope_type": "default", **config.get("rope_parameters", {})}
    for key, name in GGUF_ROPE_KEYS.items():
        if prefix + key in meta:
            rope[name] = meta[prefix + key]
    if "rope_theta" in rope:
        config["rope_parameters"] = {**rope, "rope_theta": float(rope["rope_theta"])}
    config["num_hidden_layers"] = layout.num_layers  # without llama.cpp's multi-token-prediction blocks
    names = {t.name: t for t in layout.resident}
    if "token_embd.weight" not in names:
        raise ExpertPagerError(f"{layout.path}: no token_embd.weight tensor")
    config["vocab_size"] = names["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output.weight" not in names
    dense = [i for i in range(layout.num_layers) if i not in set(layout.moe_layers)]
    if dense:
        config["mlp_only_layers"] = dense
    for needed in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if needed not in config:
            raise ExpertPagerError(f"{layout.path}: GGUF metadata lacks the key that gives {needed}")
    if arch.mla:
        _mla_config(layout, config)
    if arch.hybrid:
        _hybrid_config(layout, arch, config)
    return config
