"""One generation run, paged or fully resident, and the stats a user wants after it."""

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import ExpertPagerError
from .runtime import native
from .runtime.compact_modules import CompactLinear
from .runtime.generate import Generation, generate
from .runtime.load import load, load_all_cached, no_transformers_bars


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (for a .gguf, built from its metadata), or None when it has none."""
    p = Path(path)
    if (p / "resident.gguf").exists():  # a folder repacked from a GGUF keeps its metadata there
        p = p / "resident.gguf"
    if p.suffix == ".gguf":
        folder, kwargs = p.parent, {"gguf_file": p.name}
    elif any((p / name).exists() for name in TOKENIZER_FILES):
        folder, kwargs = p, {}
    else:
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt token ids for a conversation through the tokenizer's chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def load_resident(path: str, adapter: str | Path | None = None, **load_options) -> PreTrainedModel:
    """The same checkpoint fully in memory: a local HF safetensors checkpoint through plain transformers, with the
    LoRA adapter folder `adapter` applied by peft itself when given; a GGUF, a repacked store or a remote model
    through the same paged code with every slice cached and loaded first (load_all_cached, with the tier, dtype, I/O,
    store and progress options of `load_options`; budgets and predictors do not apply)."""
    from .model.read_layout import read_layout
    from .remote import is_remote

    if is_remote(str(path)) or read_layout(path).format != "safetensors":
        if adapter is not None:
            raise ExpertPagerError(f"{path}: --resident and --compare with an adapter need a local HF safetensors checkpoint")
        keep = ("expert_cache", "dtype", "quantize", "io", "threads", "progress", "store", "disk", "offline")
        return load_all_cached(path, **{k: v for k, v in load_options.items() if k in keep})
    with no_transformers_bars():
        model = AutoModelForCausalLM.from_pretrained(read_layout(path).path).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def parse_adapters(values: list[str]) -> dict[str, str]:
    """`--adapter` values, PATH or NAME=PATH, as NAME -> PATH (a bare PATH is named after its folder)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name:
            name, path = Path(value).name, value
        if not name or not path:
            raise ExpertPagerError(f"--adapter takes PATH or NAME=PATH, got {value!r}")
        if name in out:
            raise ExpertPagerError(f"--adapter: two adapters named {name!r}; name them with NAME=PATH")
        out[name] = path
    return out


def adapter_choice(adapters: dict[str, str], use: str | None) -> str | None:
    """The adapter a run uses: `use` (none: the base model), else the first one given."""
    if use == "none":
        return None
    if use is not None and use not in adapters:
        raise ExpertPagerError(f"--use-adapter {use!r}: no such adapter; given: {', '.join(adapters) or 'none'}")
    return use or next(iter(adapters), None)


@dataclass
class RunResult:
    generation: Generation
    stats: dict
    text: str | None


def run_once(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int,
             tokenizer=None, on_token=None) -> RunResult:
    """Generate and collect stats (pager counters when the model is paged)."""
    if not prompt_ids:
        raise ExpertPagerError("the prompt is empty")
    eos = tokenizer.eos_token_id if tokenizer is not None else model.generation_config.eos_token_id
    gen = generate(model, prompt_ids, max_new_tokens, temperature, seed, eos, on_token)
    resident_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    stats = {
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": len(gen.tokens),
        "prefill_tokens_per_s": gen.prefill_tokens_per_s,
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "resident_bytes": resident_bytes,
    }
    if any(getattr(m, "compact", False) or isinstance(m, CompactLinear) for m in model.modules()):
        stats["kernels"] = native.describe()
    pager = getattr(model, "pager", None)
    if pager is not None:
        s = pager.stats_snapshot()
        stats.update(hit_rate=s.hit_rate, prefetch_hit_rate=s.prefetch_hit_rate,
                     hits=s.hits, misses=s.misses, bytes_read=s.bytes_read, stall_seconds=s.stall_seconds,
                     read_gbps=s.read_gbps, cache_bytes=pager.pool_bytes, cache_slots=pager.num_slots,
                     expert_bytes=model.layout.expert_bytes, policy=type(pager.policy).__name__.lower())
        store = getattr(model, "store", None)
        if store is not None:
            stats.update(store.stats().to_dict())
        adapters = getattr(model, "adapters", None)
        if adapters is not None and adapters.names:
            stats.update(adapter=adapters.active, adapter_hit_rate=s.adapters.hit_rate,
                         adapter_bytes_read=s.adapters.bytes_read, adapter_resident_bytes=adapters.resident_bytes)
    else:
        stats.update(hit_rate=1.0, prefetch_hit_rate=0.0, bytes_read=0, stall_seconds=0.0, cache_bytes=0)
    text = tokenizer.decode(gen.tokens, skip_special_tokens=True) if tokenizer is not None else None
    return RunResult(gen, stats, text)


def open_model(model_ref: str, resident: bool, **load_options) -> PreTrainedModel:
    """Paged (default) or fully resident (with the chosen adapter applied by peft)."""
    if resident:
        rest = {k: v for k, v in load_options.items() if k not in ("adapter", "adapters")}
        chosen = load_options.get("adapter")
        return load_resident(model_ref, load_options["adapters"][chosen] if chosen else None, **rest)
    return load(model_ref, **load_options)

