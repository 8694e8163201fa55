"""Load a checkpoint as a transformers model whose expert weights stream through the pager."""

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from ..errors import ExpertPagerError
from ..model.gguf_config import gguf_arch
from ..model.layout import ExpertSlice, Layout, SliceKey
from ..model.plan import COMPACT_RUNTIME_OVERHEAD, RUNTIME_OVERHEAD, MemoryPlan, plan_cache, plan_memory, resident_in_memory
from ..remote import Store, resolve_layout
from ..pager import Decoder, SliceCache, checksum_verifier
from ..pager.replay import slot_needs
from ..progress import progress_bar
from ..pager.decode import staging_bytes
from ..sizes import parse_size
from .adapter_store import adapter_pieces
from .adapters import Adapters, attach_resident, read_adapters
from .gguf_model import FLOAT_TYPES, build_gguf_model, gguf_dtype
from .compact_modules import pack_linears
from .compact import compact_bytes, compactor, is_compact
from .decode_attention import use_decode_attention
from .paged_experts import DTYPE_NAMES, PagedExperts, dequantizer, realigner, resident_offsets, stored_offsets
from .moe_layers import moe_layers
from .predictors import NextLayer, Predictor, make_predictors
from .prefetcher import Prefetcher
from .speculator import Speculator, find_speculator

EXPERT_CACHES = ("auto", "compact", "dequantized", "raw")
DEFAULT_EXPERT_CACHE = EXPERT_CACHES[0]
"""What the cache holds for slices not stored in the compute dtype: compact (int4/int8 layouts that the native kernels
or torch's CPU kernels multiply directly, at about the stored size; see runtime/compact.py and runtime/native.py),
the dequantized tensors (decoded once at page-in; a hit is a plain matmul) or the raw blocks (decoded on every
use). auto: compact for a quantized GGUF whose experts carry no biases, else dequantized. See bench/README.md."""

EXPERTS_MODULE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts$")
EXPERT_KEYS = [r"\.experts\."] + [r"\.experts\.(gate_up_proj|down_proj)", r"block_sparse_moe\.(input|output)_linear"]


def paged_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of `base` whose experts modules are replaced, at construction, by PagedExperts (no parameters),
    so from_pretrained loads only resident weights and skips expert tensors as expected-unexpected keys."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        for name, module in list(self.named_modules()):
            m = EXPERTS_MODULE.search(name)
            if m:
                parent_name, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent_name), child, PagedExperts(module, int(m.group(1))))

    return type(f"Paged{base.__name__}", (base,), {
        "__init__": __init__,
        "__module__": base.__module__,  # transformers reads the architecture's module to allow grouped_mm
        "_keys_to_ignore_on_load_unexpected": EXPERT_KEYS + list(base._keys_to_ignore_on_load_unexpected or []),
    })


QUANTIZE = ("int4", "int8")


def resolve_tier(layout: Layout, expert_cache: str, quantize: str | None = None) -> str:
    """The expert cache tier `expert_cache` names, with "auto" resolved (see EXPERT_CACHES); `quantize` (int4 or
    int8) puts float experts in the compact tier too."""
    if expert_cache not in EXPERT_CACHES:
        raise ExpertPagerError(f"unknown expert cache {expert_cache!r}: use one of {', '.join(EXPERT_CACHES)}")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ExpertPagerError(f"unknown quantization {quantize!r}: use int4 or int8")
        if expert_cache not in ("auto", "compact"):
            raise ExpertPagerError(f"--quantize {quantize} makes the compact expert cache, not {expert_cache}")
        expert_cache = "compact"
    if all(is_compact(s) for s in layout.slices.values()):  # `repack --compact` stored them transcoded
        if expert_cache not in ("auto", "compact"):
            raise ExpertPagerError(f"{layout.path}: its experts are stored in the compact layout; use --expert-cache compact")
        return "compact"
    parts = [p for s in layout.slices.values() for p in s.parts]
    biased = any(p.role.endswith("_bias") for p in parts)
    compactable = (quantize is not None or any(p.dtype not in FLOAT_TYPES for p in parts)) and not biased
    if expert_cache == "compact" and not compactable:
        raise ExpertPagerError(f"{layout.path}: the compact expert cache needs quantized experts without biases; "
                               "use --expert-cache dequantized")
    has_kernels = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if expert_cache == "compact" and not has_kernels:
        raise ExpertPagerError(f"the compact expert cache needs torch's CPU int4 kernels (torch >= 2.6; this is {torch.__version__})")
    if expert_cache == "auto":
        return "compact" if compactable and has_kernels else "dequantized"
    return expert_cache


def compute_dtype(layout: Layout, dtype: torch.dtype | str, tier: str = "dequantized") -> torch.dtype:
    """The dtype the model computes in: as asked, or for "auto" the checkpoint's own (GGUF: see gguf_dtype), and
    always bfloat16 in the compact tier (its kernels take bfloat16 activations)."""
    if tier == "compact":
        if dtype not in ("auto", "bfloat16", torch.bfloat16):
            raise ExpertPagerError(f"the compact expert cache computes in bfloat16, not {dtype}; use --expert-cache dequantized")
        return torch.bfloat16
    if layout.weights_format == "gguf":
        return gguf_dtype(layout, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype != "auto" else layout.config.get("dtype") or layout.config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def gguf_transposed(layout: Layout) -> bool:
    """A GGUF of gpt-oss: llama.cpp's separate [out, in] gate and up where transformers' module multiplies an
    interleaved [in, out] gate_up (see paged_experts.transposed_slice)."""
    return layout.weights_format == "gguf" and gguf_arch(layout).fused_transposed


def expert_offsets(layout: Layout, dtype: torch.dtype) -> dict[SliceKey, dict[str, int]]:
    """Each slice's weight matrices at their fully resident addresses modulo ALIGN (see resident_offsets)."""
    return {k: resident_offsets(s, dtype, layout.format == "safetensors") for k, s in layout.slices.items()}


def expert_tier(layout: Layout, expert_cache: str, dtype: torch.dtype,
                quantize: str | None = None) -> tuple[Decoder | None, dict[SliceKey, ExpertSlice]]:
    """The cache's decode step (None: it holds the stored bytes) and the slices as it serves them. The dequantized
    tier decodes only when some part is not already stored in the compute dtype; slices stored in it whose weights
    would sit at another alignment than the resident model's are moved to it in their slot once per page-in. A gpt-oss
    GGUF's slices are always decoded, into transformers' interleaved, transposed layout (except in the raw tier)."""
    tier = resolve_tier(layout, expert_cache, quantize)
    stored = {p.dtype for s in layout.slices.values() for p in s.parts}
    if tier == "raw":
        return None, layout.slices
    if tier == "compact":
        if all(is_compact(s) for s in layout.slices.values()):
            return None, layout.slices
        return compactor(layout.slices, requantize=quantize == "int4")
    offsets = expert_offsets(layout, dtype)
    if gguf_transposed(layout) or stored != {DTYPE_NAMES.get(dtype)}:
        return dequantizer(layout.slices, dtype, offsets, transpose=gguf_transposed(layout))
    if all(stored_offsets(s) == offsets[k] for k, s in layout.slices.items()):
        return None, layout.slices
    return realigner(layout.slices, offsets)


def plan_budget(layout: Layout, max_memory: str | int | None, cache: str | int | None,
                decoder: Decoder | None = None, threads: int = 4, dtype: torch.dtype | None = None,
                extra_resident: int = 0, tier: str = "dequantized",
                pieces: Mapping[tuple, ExpertSlice] | None = None, requantize: bool = False) -> MemoryPlan:
    """The cache size from `cache` (bytes or 'NN%' of all expert bytes as stored) or from the whole-process
    `max_memory`; everything fits when neither is given. Slots are sized as the cache holds slices (decoded when
    `decoder` is given, plus its staging buffers for `threads` workers); GGUF resident tensors count at `dtype`;
    `extra_resident` bytes (a speculator's maps, resident LoRA) count as resident too; in the compact `tier` as the
    compact resident modules hold them (resident_held, `requantize` there). Adapter `pieces` share the cache: with no size given it
    holds them all too, and its minimum holds one layer's top-k of them beside the slices."""
    if max_memory is not None and cache is not None:
        raise ExpertPagerError("give either max_memory (the whole process) or cache (the expert cache), not both")
    plan = _plan_slices(layout, max_memory, cache, decoder, threads, dtype, extra_resident, tier,
                        sum(slot_needs(pieces).values()) if pieces else 0, requantize)
    if not pieces:
        return plan
    return replace(plan, min_cache_bytes=plan.min_cache_bytes + layout.experts_per_token * max(slot_needs(pieces).values()))


def _plan_slices(layout: Layout, max_memory: str | int | None, cache: str | int | None, decoder: Decoder | None,
                 threads: int, dtype: torch.dtype | None, extra_resident: int, tier: str, piece_bytes: int,
                 requantize: bool = False) -> MemoryPlan:
    raw = slot_needs(layout.slices)
    needs, staging = list(raw.values()), 0
    if decoder is not None and decoder.in_place:
        needs = [max(n, decoder.slot_bytes(k)) for k, n in raw.items()]
    elif decoder is not None:
        needs = [decoder.slot_bytes(k) for k in raw]
        size, count = staging_bytes(raw, threads)
        staging = size * count
    slot = max(needs)
    if cache is not None:
        text = str(cache).strip()
        try:
            size = int(sum(raw.values()) * float(text[:-1]) / 100) if text.endswith("%") else parse_size(text)
        except ValueError:
            raise ExpertPagerError(f"cannot read cache size {text!r}: use bytes, a size such as 2GB, or a percentage such as 25%") from None
        plan = plan_cache(layout, size, slot, staging=staging)
    elif max_memory is not None:
        itemsize = dtype.itemsize if dtype is not None and layout.weights_format == "gguf" else None
        compact_resident = tier == "compact" and layout.weights_format == "gguf"
        resident = resident_held(layout, requantize) if compact_resident else resident_in_memory(layout, itemsize)
        plan = plan_memory(layout, parse_size(max_memory), slot, staging=staging, resident=resident + extra_resident,
                           overhead=COMPACT_RUNTIME_OVERHEAD if compact_resident else RUNTIME_OVERHEAD)
    else:
        plan = plan_cache(layout, sum(needs) + staging + piece_bytes, slot, staging=staging)
    return plan


def memory_plan(layout: Layout, max_memory: str | int | None, expert_cache: str = DEFAULT_EXPERT_CACHE,
                cache: str | int | None = None) -> MemoryPlan:
    """How `max_memory` (or an expert cache of `cache`) splits for this layout in the tier `expert_cache` picks, as
    `load` would split it (what `inspect --max-memory` shows)."""
    tier = resolve_tier(layout, expert_cache)
    dtype = compute_dtype(layout, "auto", tier)
    decoder, _ = expert_tier(layout, expert_cache, dtype)
    return plan_budget(layout, max_memory, cache, decoder, dtype=dtype, tier=tier)


def resident_held(layout: Layout, requantize: bool = False) -> int:
    """Bytes a quantized GGUF's resident tensors take in the compact tier: quantized matrices packed (with
    `requantize` all as int4), the token embedding as stored unless lm_head shares it, everything else in bfloat16
    (see gguf_model.compact_resident)."""
    tied = not any(t.name == "output.weight" for t in layout.resident)
    total = 0
    for t in layout.resident:
        if t.dtype in FLOAT_TYPES or len(t.shape) != 2 or (tied and t.name == "token_embd.weight"):
            total += math.prod(t.shape) * 2
        else:
            total += t.length if t.name == "token_embd.weight" else compact_bytes(t.dtype, t.shape, requantize)
    return total


def min_cache_bytes(layout: Layout, expert_cache: str = DEFAULT_EXPERT_CACHE, dtype: torch.dtype | str = "auto",
                    pieces: Mapping[tuple, ExpertSlice] | None = None) -> int:
    """The smallest cache `load` accepts: one layer's top-k slots as the tier holds them (and as many for adapter
    `pieces`, when given), plus decode staging."""
    decoder, _ = expert_tier(layout, expert_cache, compute_dtype(layout, dtype, resolve_tier(layout, expert_cache)))
    return plan_budget(layout, None, None, decoder, pieces=pieces).min_cache_bytes


def cache_budget(layout: Layout, max_memory: str | int | None, cache: str | int | None,
                 decoder: Decoder | None = None, threads: int = 4, dtype: torch.dtype | None = None,
                 extra_resident: int = 0, tier: str = "dequantized",
                 pieces: Mapping[tuple, ExpertSlice] | None = None, requantize: bool = False) -> MemoryPlan:
    """plan_budget, with a clear error when the minimum cache does not fit."""
    plan = plan_budget(layout, max_memory, cache, decoder, threads, dtype, extra_resident, tier, pieces, requantize)
    staging = plan.staging_bytes
    if not plan.fits:
        need = plan.min_cache_bytes + plan.resident_bytes + plan.reserve_bytes if max_memory is not None else plan.min_cache_bytes
        what = "max_memory" if max_memory is not None else "the cache"
        raise ExpertPagerError(f"{layout.path}: {what} is too small: at least {need:,} bytes are needed "
                               f"(one layer's top-{layout.experts_per_token} slices of {plan.slice_bytes:,} bytes"
                               + (" and their adapter pieces" if pieces else "")
                               + (f", {staging:,} staging" if staging else "")
                               + (f", {plan.resident_bytes:,} resident, {plan.reserve_bytes:,} reserve)" if max_memory is not None else ")"))
    return plan


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers' own per-weight progress bars off for a while: the project shows its own."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load(model_ref: str | Path, max_memory: str | int | None = None, cache: str | int | None = None,
         policy: str = "lru", prefetch: bool = True, io: str = "auto", threads: int = 4,
         dtype: torch.dtype | str = "auto", expert_cache: str = DEFAULT_EXPERT_CACHE,
         predictors: "str | Sequence[str | Predictor] | None" = None, profiles: str | Path | None = None,
         speculator: "str | Path | Speculator | bool | None" = None, progress: bool = False,
         quantize: str | None = None, store: "str | Path | Store | None" = None, disk: str | int | None = None,
         offline: bool | None = None, extra_resident: int = 0, adapters: Mapping[str, str | Path] | None = None,
         adapter: str | None = None) -> PreTrainedModel:
    """A transformers causal LM for `model_ref` with paged experts; `model.pager` is its SliceCache.

    max_memory: the whole-process promise (resident + reserve + cache), e.g. '8GB'; cache: the expert cache
    directly, bytes or a percentage of all expert bytes as stored ('25%'); neither: every slice fits.
    expert_cache: "auto", "compact", "dequantized" or "raw", what the cache holds for quantized slices (see
    EXPERT_CACHES).
    predictors: 'next-layer,temporal,domain' or Predictor instances, fed by `model.prefetcher`; profiles: the
    domain predictor's folder. speculator: the fitted maps next-layer prediction uses: None (default) the model
    folder's `speculator.safetensors` when there is one, a path to such a file, or False for the plain routers;
    `model.speculator` is the one in use. progress: a bar on stderr while a GGUF's resident tensors load.
    quantize: "int4" or "int8" holds a float checkpoint's experts in the compact tier (round to nearest per group
    of 32, or per row), computing in bfloat16, and resident linear layers but routers as int8 rows (pack_linears; so
    are those of a float checkpoint repacked with --quantize). extra_resident: bytes the caller will hold beside the
    model (calibration statistics), counted against max_memory.
    A remote `model_ref` (hf://org/name, https://.../model.gguf, a folder URL) runs from its local store (`store`: a
    folder or an open Store; default under the HF cache) under a disk budget `disk`; `offline` (default: the Hub's
    offline mode) uses only what the store holds; `model.store` is the Store, or None for a local checkpoint.
    adapters: NAME -> PEFT LoRA folder; their expert LoRA is paged through `model.pager` beside the slices, their
    resident LoRA held in memory; `model.adapters` chooses one (`model.adapters.use(NAME)`), `adapter` at first."""
    if isinstance(store, Store):
        layout, remote = store.layout, store
    else:
        layout, remote = resolve_layout(str(model_ref), store, parse_size(disk) if disk is not None else None, offline)
    if remote is not None:
        remote.fetch_resident(progress)
    if layout.quantize is not None and quantize not in (None, layout.quantize):
        raise ExpertPagerError(f"{layout.path}: its slices were stored with --quantize {layout.quantize}, not {quantize}")
    quantize = quantize or layout.quantize  # a store repacked with --quantize: resident linears as it was made for
    tier = resolve_tier(layout, expert_cache, quantize)
    infos = read_adapters(adapters or {}, layout.num_experts)
    if tier == "compact" and any(info.experts for info in infos.values()):
        raise ExpertPagerError("expert LoRA is merged into float expert weights; the compact expert cache has none "
                               "(use --expert-cache dequantized, or no --quantize)")
    dtype = compute_dtype(layout, dtype, tier)
    decoder, served = expert_tier(layout, expert_cache, dtype, quantize)
    offsets = {} if tier == "compact" else expert_offsets(layout, dtype)  # compact slices are served as stored
    def budget(extra: int, pieces: Mapping[tuple, ExpertSlice] | None = None) -> MemoryPlan:
        return cache_budget(layout, max_memory, cache, decoder, threads, dtype, extra, tier, pieces, quantize == "int4")

    plan = budget(extra_resident)  # fails fast
    if layout.weights_format == "gguf":
        config = AutoConfig.for_model(gguf_arch(layout).config_type)
        model = build_gguf_model(layout, paged_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]), dtype,
                                 compact=tier == "compact", progress=progress, requantize=quantize == "int4")
    else:
        config = AutoConfig.from_pretrained(layout.path).get_text_config()  # a multimodal wrapper's text model
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        with no_transformers_bars():
            model = paged_class(base).from_pretrained(layout.path, config=config, dtype=dtype,
                                                       experts_implementation="grouped_mm")
    model.eval()
    if tier == "compact":
        use_decode_attention(model)
    packed = pack_linears(model, quantize == "int4") if tier == "compact" and layout.weights_format != "gguf" else 0
    if packed and max_memory is not None:  # the plan counted them as loaded (the peak); the cache gets what they freed
        plan = budget(extra_resident - packed)
    chosen = make_predictors(predictors, profiles)
    unfitted = [p for p in chosen if isinstance(p, NextLayer) and p.speculator is None]
    model.speculator = None
    if unfitted or speculator not in (None, False):
        model.speculator = find_speculator(layout.path, speculator, [l.index for l in moe_layers(model)],
                                           model.config.hidden_size, layout.num_experts)
        for p in unfitted:
            p.speculator = model.speculator
        if model.speculator is not None and max_memory is not None:  # its maps stay in memory too
            plan = budget(extra_resident + model.speculator.nbytes - packed)
    model.adapters = Adapters(infos)
    pieces = model.adapters.pieces
    if infos:
        paged = {m.layer: m for m in model.modules() if isinstance(m, PagedExperts)}
        model.adapters.resident_bytes = attach_resident(model, infos, model.adapters)
        for info in infos.values():
            missing = [layer for layer in info.expert_layers if layer not in paged]
            if missing:
                raise ExpertPagerError(f"{info.path}: the adapter adapts experts of layer {missing[0]}, which has none")
            pieces.update(adapter_pieces(info, layout.num_experts, {l: m.is_transposed for l, m in paged.items()}, dtype,
                                         progress))
        model.adapters.select(adapter)
        extra = extra_resident - packed + model.adapters.resident_bytes + (model.speculator.nbytes if model.speculator is not None else 0)
        plan = budget(extra, pieces)
    verify = checksum_verifier(layout.slices, layout.checksums) if layout.checksums else None
    pager = SliceCache({**layout.slices, **pieces}, plan.cache_bytes, policy=policy, io=io, threads=threads,
                       min_pinned=layout.experts_per_token, verify=verify, decode=decoder,
                       source=remote.hold if remote is not None else None,
                       announce=remote.announce if remote is not None else None)
    for module in model.modules():
        if isinstance(module, PagedExperts):
            module.cache = pager
            module.slices = {e: served[(module.layer, e)] for e in range(layout.num_experts)}
            module.offsets = {e: offsets[(module.layer, e)] for e in range(layout.num_experts)} if offsets else {}
            module.dtype = dtype
            module.compact = tier == "compact"
            module.transpose = decoder is None and gguf_transposed(layout)  # a raw-tier slice, rebuilt per use
            per_expert = 2 if pieces else 1  # a slice and its adapter piece
            module.chunk = max(layout.experts_per_token, pager.num_slots // per_expert // (2 if prefetch else 1))
            if not prefetch:
                module.chunk = pager.num_slots // per_expert
            module.adapters = model.adapters if infos else None
    model.pager = pager
    model.store = remote
    model.layout = layout
    model.memory_plan = plan
    model.prefetcher = Prefetcher(model, chosen) if chosen else None
    return model


def load_all_cached(model_ref: str | Path, expert_cache: str = DEFAULT_EXPERT_CACHE, dtype: torch.dtype | str = "auto",
                    quantize: str | None = None, io: str = "auto", threads: int = 4, progress: bool = False,
                    **remote) -> PreTrainedModel:
    """`model_ref` fully in memory through the paged code: a cache that holds every slice in the same tier and
    dtype, every slice loaded before this returns, the cache's counters reset (so a run reads nothing and hits
    every time). How a GGUF or a repacked store runs "resident", to compare with its paged runs; `remote`: load's
    store, disk and offline for a remote model."""
    model = load(model_ref, expert_cache=expert_cache, dtype=dtype, quantize=quantize, io=io, threads=threads,
                 prefetch=False, progress=progress, **remote)
    layers = sorted({layer for layer, _ in model.layout.slices})
    with progress_bar(f"loading {len(model.layout.slices)} expert slices", len(layers), progress) as advance:
        for layer in layers:
            with model.pager.pin_many([k for k in model.layout.slices if k[0] == layer]):
                advance()
    model.pager.reset_stats()
    return model
