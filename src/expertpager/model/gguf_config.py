"""A transformers config for a GGUF checkpoint, built from its metadata and tensor shapes (headers only)."""

from ..errors import ExpertPagerError
from .architectures import GGUF_CONFIG_KEYS, GGUF_ROPE_KEYS, GGUF_RUNNABLE, GGUF_TOKEN_KEYS, Arch
from .layout import Layout


def gguf_arch(layout: Layout) -> Arch:
    """The architecture entry that runs this GGUF, or an error naming the runnable ones."""
    arch = GGUF_RUNNABLE.get(layout.architecture)
    if arch is None:
        raise ExpertPagerError(f"{layout.path}: running GGUF architecture {layout.architecture!r} is not supported; "
                               f"runnable: {', '.join(sorted(GGUF_RUNNABLE))}")
    return arch


def hf_config_dict(layout: Layout) -> dict:
    """Keyword arguments for `AutoConfig.for_model` (model_type included) that describe this GGUF's model."""
    arch = gguf_arch(layout)
    meta, prefix = layout.config, layout.architecture + "."
    config: dict = {"model_type": arch.model_type, **arch.gguf_defaults}
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
    return config
