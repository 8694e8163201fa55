"""The `expertpager` command line: parse, call, print. Errors are one line on stderr and exit code 2."""

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import ExpertPagerError
from .sizes import format_size, parse_size

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run mixture-of-experts models larger than memory by paging expert slices from disk.")
console = Console()
MODEL_HELP = ("A model folder (config.json + *.safetensors), a .gguf file, org/name[@rev][:QUANT] from the local HF cache, "
              "or a remote checkpoint: hf://org/name[@rev][:QUANT], https://.../model.gguf, or a folder URL ending in /.")
STORE = typer.Option(None, "--store", help="A remote model's local store (default: a folder under the Hugging Face cache).")
DISK = typer.Option(None, "--disk", help="Disk budget of a remote model's store, e.g. 20GB: least recently used slices "
                    "are deleted beyond it.")
OFFLINE = typer.Option(None, "--offline/--online", help="Use only what the store holds (default: offline when "
                       "HF_HUB_OFFLINE=1).")


@app.callback()
def _root() -> None:
    """Run mixture-of-experts models larger than memory by paging expert slices from disk."""


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    max_memory: str = typer.Option(None, "--max-memory", help="Memory promise for the whole process, e.g. 8GB (10^9) or 8GiB (2^30): show how big an expert cache fits."),
    store: str = STORE,
    offline: bool = OFFLINE,
) -> None:
    """Show a checkpoint's MoE geometry and what each part costs in bytes, reading headers only (by HTTP range for a
    remote checkpoint)."""
    from .remote import resolve_layout
    from .report import describe

    layout, remote = resolve_layout(model, store, None, offline)
    info = describe(layout, parse_size(max_memory) if max_memory else None)
    if remote is not None:
        info.update(path=model, store=str(remote.folder), slices_in_store=len(remote.present()))
    if json_out:
        print(json.dumps(info))
        return
    _print_inspect(info)


def _print_inspect(info: dict) -> None:
    t = Table(title=f"{info['path']}", show_header=False)
    rows = [
        ("architecture", f"{info['architecture']} ({info['format']}, {info['files']} file(s))"),
        ("layers", f"{info['num_layers']} ({info['num_moe_layers']} MoE, dense: {info['dense_layers'] or 'none'})"),
    ]
    if info["linear_attention_layers"]:
        rows.append(("  linear attention", f"{len(info['linear_attention_layers'])} layers, fixed state "
                                           f"{format_size(info['linear_state_bytes'])} (no KV cache)"))
    rows += [
        ("experts per layer / per token", f"{info['num_experts']} / {info['experts_per_token']}"),
        ("expert slices", f"{info['num_slices']}, largest {format_size(info['slice_bytes'])}"),
    ]
    rows += [(f"  slice as {types}", format_size(n)) for types, n in info["slice_bytes_by_type"].items()]
    rows += [("all experts", format_size(info["expert_bytes"])), ("resident", format_size(info["resident_bytes"]))]
    rows += [(f"  {cat}", format_size(n)) for cat, n in sorted(info["resident_breakdown"].items(), key=lambda kv: -kv[1])]
    rows += [("total", format_size(info["total_bytes"])), ("touched per token", format_size(info["bytes_per_token"]))]
    plan = info.get("plan")
    if plan:
        rows.append(("max memory", f"{format_size(plan['max_memory'])} = resident + reserve {format_size(plan['reserve_bytes'])} + cache"))
        if plan["fits"]:
            rows.append(("cache", f"{format_size(plan['cache_bytes'])}: {plan['cache_slices']} slices, "
                                  f"{100 * plan['cache_fraction']:.1f}% of all experts"))
        else:
            rows.append(("cache", f"does not fit: {format_size(plan['shortfall'])} short of the minimum "
                                  f"{format_size(plan['min_cache_bytes'])} (one layer's top-k slices)"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _prompt_ids(tokenizer, prompt: str | None, prompt_ids: str | None) -> list[int]:
    if prompt_ids is not None:
        try:
            return [int(x) for x in prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise ExpertPagerError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    if tokenizer is None:
        raise ExpertPagerError("this checkpoint has no tokenizer: give --prompt-ids 1,2,3")
    return tokenizer(prompt if prompt is not None else DEFAULT_PROMPT)["input_ids"]


DEFAULT_PROMPT = "The for statement is used to"
STAT_ROWS = (("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}"), ("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
             ("hit rate", "hit_rate", "{:.1%}"), ("prefetch hit rate", "prefetch_hit_rate", "{:.1%}"),
             ("bytes read from disk", "bytes_read", "size"), ("stall time", "stall_seconds", "{:.3f} s"),
             ("expert cache", "cache_bytes", "size"), ("resident weights", "resident_bytes", "size"),
             ("peak RSS", "peak_rss_bytes", "size"))
REMOTE_ROWS = (("store hit rate", "store_hit_rate", "{:.1%}"), ("fetched remotely", "remote_bytes", "size"),
               ("remote fetch time", "remote_seconds", "{:.3f} s"), ("store on disk", "store_bytes", "size"))
KERNEL_ROWS = (("compact kernels", "kernels", "{}"),)
ADAPTER_ROWS = (("adapter piece hit rate", "adapter_hit_rate", "{:.1%}"), ("adapter bytes read", "adapter_bytes_read", "size"))


def _stats_table(columns: dict[str, dict]) -> Table:
    t = Table(title="stats")
    t.add_column("")
    for name in columns:
        t.add_column(name, justify="right")
    rows = STAT_ROWS + (REMOTE_ROWS if any("remote_bytes" in c for c in columns.values()) else ())
    rows += ADAPTER_ROWS if any("adapter_hit_rate" in c for c in columns.values()) else ()
    rows += KERNEL_ROWS if any("kernels" in c for c in columns.values()) else ()
    for label, key, fmt in rows:
        cells = [format_size(c.get(key, 0)) if fmt == "size" else fmt.format(c.get(key, 0)) for c in columns.values()]
        t.add_row(label, *cells)
    return t


MODEL = typer.Argument(None, help="Model folder, .gguf file or cached org/name; default: the bundled demo MoE.")
MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory promise for the whole process (resident + reserve + cache), e.g. 8GB.")
CACHE = typer.Option(None, "--cache", help="Expert cache size: bytes (2GB, 512MiB) or a percentage of all expert bytes (25%).")
POLICY = typer.Option("lru", "--policy", help="Eviction policy: lru, lfu, cycle.")
PREFETCH = typer.Option(True, "--prefetch/--no-prefetch", help="Load the next chunk of experts while one computes.")
PREDICTOR = typer.Option(None, "--predictor", help="Prefetch predictors, comma-separated: next-layer[:AHEAD][+EXTRA|-FEWER] (e.g. next-layer+4: top-k+4; next-layer-2: top-k-2), temporal, domain.")
PROFILES = typer.Option(None, "--profiles", help="Folder of domain profiles for --predictor domain (see `expertpager profile`).")
SPECULATOR = typer.Option(None, "--speculator", help="Fitted maps for --predictor next-layer (see `expertpager calibrate`): a .safetensors file, or none for the plain routers; default: the model folder's speculator.safetensors when present.")
IO = typer.Option("auto", "--io", help="Page-in I/O: auto, direct (O_DIRECT), buffered+dontneed, buffered.")
EXPERT_CACHE = typer.Option("auto", "--expert-cache",
                            help="What the cache holds for quantized slices: compact (int4/int8 at about the stored size, multiplied by int8 activations with the native kernels where the CPU has AVX2 or AVX-512, else by bfloat16 ones; the default for a quantized GGUF), dequantized (decoded once at page-in) or raw (decoded on every use). auto picks compact where it applies.")
ADAPTER = typer.Option(None, "--adapter", help="A PEFT LoRA adapter folder, as PATH or NAME=PATH (name: the folder's); repeat for several. Its expert LoRA is paged through the same cache.")
QUANTIZE = typer.Option(None, "--quantize", help="int4 or int8: hold a bf16/f16/f32 checkpoint's experts and resident linear layers in the compact tier (round to nearest per 32 weights, or per row), computed as that tier computes. On a quantized GGUF, int4 also requantizes its 5/6/8-bit matrices (Q6_K lm_head, Q6_K experts) to int4: smaller and faster, less exact.")


def _load_options(max_memory, cache, policy, prefetch, predictor, profiles, speculator, io, expert_cache, quantize,
                  progress: bool) -> dict:
    """The paging options that run and serve share, as `load`'s keyword arguments."""
    return dict(max_memory=max_memory, cache=cache, policy=policy, prefetch=prefetch, io=io, expert_cache=expert_cache,
                predictors=predictor, profiles=profiles, speculator=False if speculator == "none" else speculator,
                progress=progress, quantize=quantize)


@app.command()
def run(
    model: str = MODEL,
    prompt: str = typer.Option(None, "--prompt", "-p", help=f"Prompt text (default: {DEFAULT_PROMPT!r})."),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt as token ids, e.g. 1,2,3 (for checkpoints without a tokenizer)."),
    chat: bool = typer.Option(False, "--chat", help="Read user turns from stdin and answer with the model's chat template."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    max_memory: str = MAX_MEMORY,
    cache: str = CACHE,
    policy: str = POLICY,
    prefetch: bool = PREFETCH,
    predictor: str = PREDICTOR,
    profiles: str = PROFILES,
    speculator: str = SPECULATOR,
    resident: bool = typer.Option(False, "--resident", help="Run the same model fully in memory: plain transformers for a safetensors checkpoint; for a GGUF or repacked store the same code with every slice cached and loaded first."),
    compare: bool = typer.Option(False, "--compare", help="Run fully resident (see --resident) and paged, one after the other, and show both."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    seed: int = typer.Option(0, "--seed"),
    io: str = IO,
    expert_cache: str = EXPERT_CACHE,
    quantize: str = QUANTIZE,
    store: str = STORE,
    disk: str = DISK,
    offline: bool = OFFLINE,
    adapter: list[str] = ADAPTER,
    use_adapter: str = typer.Option(None, "--use-adapter", help="The adapter this run uses, by name (default: the first --adapter; none: the base model)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: tokens, text, stats."),
) -> None:
    """Generate text with expert slices paged from disk under a memory budget (greedy by default); a remote model's
    slices come from its local store, fetched by HTTP range when missing."""
    from .model.demo import demo_model_path
    from .remote import resolve_layout
    from .runner import adapter_choice, load_tokenizer, open_model, parse_adapters, run_once

    ref = model or str(demo_model_path())
    layout, remote = resolve_layout(ref, store, parse_size(disk) if disk else None, offline)
    if remote is not None and (resident or compare):
        raise ExpertPagerError(f"{ref}: --resident and --compare need a local checkpoint; a remote one runs paged")
    if remote is not None:
        remote.fetch_resident(progress=not json_out)
    tokenizer = load_tokenizer(layout.path)
    adapters = parse_adapters(adapter or [])
    options = _load_options(max_memory, cache, policy, prefetch, predictor, profiles, speculator, io, expert_cache, quantize,
                            progress=not json_out) | {"store": remote, "adapters": adapters,
                                                      "adapter": adapter_choice(adapters, use_adapter)}
    if chat:
        _chat(ref, tokenizer, resident, options, max_new_tokens, temperature, seed)
        return
    ids = _prompt_ids(tokenizer, prompt, prompt_ids)
    modes = ["resident", "paged"] if compare else ["resident" if resident else "paged"]
    results = {}
    for mode in modes:
        m = open_model(ref, mode == "resident", **options)
        stream = None
        if not json_out:
            console.print(f"[bold]{mode}[/bold]: ", end="")
            stream = _streamer(tokenizer)
        results[mode] = run_once(m, ids, max_new_tokens, temperature, seed, tokenizer, stream)
        if not json_out:
            console.print()
        if hasattr(m, "pager"):
            m.pager.close()
        del m
    if json_out:
        out = {mode: {"tokens": r.generation.tokens, "text": r.text, "stats": r.stats} for mode, r in results.items()}
        if compare:
            out["identical"] = results["resident"].generation.tokens == results["paged"].generation.tokens
        print(json.dumps(out if compare else next(iter(out.values()))))
        return
    console.print(_stats_table({mode: r.stats for mode, r in results.items()}))
    if compare:
        same = results["resident"].generation.tokens == results["paged"].generation.tokens
        console.print("paged output is [bold]identical[/bold] to fully resident" if same else "[red]outputs differ[/red]")


def _streamer(tokenizer):
    """Print tokens as they arrive: decoded text when a tokenizer exists, else ids."""
    seen: list[int] = []
    printed = [0]

    def on_token(token: int) -> None:
        seen.append(token)
        if tokenizer is None:
            console.print(f"{token} ", end="")
            return
        text = tokenizer.decode(seen, skip_special_tokens=True)
        console.out(text[printed[0]:], end="", highlight=False)
        printed[0] = len(text)

    return on_token


def _chat(ref, tokenizer, resident, options, max_new_tokens, temperature, seed) -> None:
    from .runner import chat_ids, open_model, run_once

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ExpertPagerError(f"{ref}: --chat needs a tokenizer with a chat template; use --prompt")
    m = open_model(ref, resident, **options)
    messages = []
    for line in sys.stdin:
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = chat_ids(tokenizer, messages)
        result = run_once(m, ids, max_new_tokens, temperature, seed, tokenizer, _streamer(tokenizer))
        console.print()
        messages.append({"role": "assistant", "content": result.text or ""})


@app.command()
def serve(
    model: str = MODEL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    max_queue: int = typer.Option(16, "--max-queue", min=1, help="Requests that may wait while one is served; more get HTTP 429."),
    max_memory: str = MAX_MEMORY,
    cache: str = CACHE,
    policy: str = POLICY,
    prefetch: bool = PREFETCH,
    predictor: str = PREDICTOR,
    profiles: str = PROFILES,
    speculator: str = SPECULATOR,
    io: str = IO,
    expert_cache: str = EXPERT_CACHE,
    quantize: str = QUANTIZE,
    adapter: list[str] = ADAPTER,
    store: str = STORE,
    disk: str = DISK,
    offline: bool = OFFLINE,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with
    /health, Prometheus /metrics, and a page at / that chats and shows the expert cache live. With --adapter, each
    adapter is listed in /v1/models and a request naming it in `model` runs with it (others run the base model). A
    remote model's slices come from its local store, fetched by HTTP range when missing; /metrics then shows the
    store's figures too."""
    from .model.demo import demo_model_path
    from .remote import resolve_layout
    from .runner import parse_adapters
    from .server.serve import serve as run_server

    ref = model or str(demo_model_path())
    layout, remote = resolve_layout(ref, store, parse_size(disk) if disk else None, offline)
    options = _load_options(max_memory, cache, policy, prefetch, predictor, profiles, speculator, io, expert_cache, quantize,
                            progress=True) | {"adapters": parse_adapters(adapter or []), "adapter": None, "store": remote}
    run_server(ref, layout, host, port, max_queue, options)


def _fractions(text: str) -> list[float]:
    try:
        return [float(x.strip().rstrip("%")) / 100 for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExpertPagerError(f"--cache must be percentages such as 10%,25%,50%, got {text!r}") from None


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Model to fit a speculator for (folder, .gguf or cached org/name)."),
    inputs: list[str] = typer.Option(..., "--input", help="Calibration text file (repeatable); not the text you evaluate on."),
    output: str = typer.Option(None, "--output", "-o", help="Where to write (default: speculator.safetensors in the model folder)."),
    ahead: int = typer.Option(1, "--ahead", min=1, help="Fit look-ahead distances 1..N (next-layer:N uses them)."),
    shrink: float = typer.Option(1e-3, "--shrink", min=0.0, help="Ridge strength toward the plain router, relative to the data."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=2, help="Use at most this many tokens of each file."),
    max_memory: str = typer.Option(None, "--max-memory", help="Memory promise for the whole process, the calibration statistics included, e.g. 12GB."),
    cache: str = typer.Option(None, "--cache", help="Expert cache while calibrating, bytes or a percentage (default: every slice fits)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Fit next-layer speculation to a model: per MoE layer, a linear map from the previous layer's residual stream
    to its router logits (ridge regression on calibration text), used by --predictor next-layer when present."""
    import numpy as np

    from .model.read_layout import read_layout
    from .runner import load_tokenizer
    from .runtime.load import load
    from .runtime.speculator import default_speculator_path, save_speculator
    from .model.plan import hidden_size
    from .tools.calibrate import calibrate as fit, statistics_bytes, windows
    from .progress import progress_bar
    from .tools.speculation import recall_precision, speculation

    layout = read_layout(model)
    tokenizer = load_tokenizer(layout.path)
    if tokenizer is None:
        raise ExpertPagerError(f"{model}: calibrating on text needs a tokenizer")
    ids = _read_ids(tokenizer, inputs, max_tokens)
    path = Path(output) if output else default_speculator_path(layout.path)
    if not path.parent.is_dir():
        raise ExpertPagerError(f"{path}: its folder does not exist")
    moe = len(layout.moe_layers)
    stats_bytes = statistics_bytes(moe, hidden_size(layout), layout.num_experts, min(ahead, max(1, moe - 1)))
    m = load(model, max_memory=max_memory, cache=cache, extra_resident=stats_bytes, progress=not json_out)
    start = time.perf_counter()
    with progress_bar("calibrating", windows(len(ids)), enabled=not json_out) as advance:
        spec = fit(m, ids, ahead=ahead, shrink=shrink, on_window=advance)
    seconds = time.perf_counter() - start
    sample = np.array(ids[:4096])
    actual, plain = speculation(m, sample, lookahead=1)
    fitted = speculation(m, sample, lookahead=1, speculator=spec)[1]
    m.pager.close()
    save_speculator(spec, path)
    rec = {name: float(np.nanmean(recall_precision(actual, p)[0][:, 0])) for name, p in (("plain", plain), ("fitted", fitted))}
    info = {"speculator": str(path), "tokens": len(ids), "ahead": spec.ahead, "layers": spec.layers,
            "statistics_bytes": stats_bytes, "cache_bytes": m.pager.pool_bytes, "seconds": round(seconds, 1),
            "recall_plain": round(rec["plain"], 4), "recall_fitted": round(rec["fitted"], 4), "recall_tokens": len(sample)}
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"speculator for {len(spec.layers)} MoE layers, distances {spec.ahead}, from {len(ids):,} tokens -> {path} "
                  f"({seconds:.1f} s; statistics {format_size(stats_bytes)}, expert cache {format_size(m.pager.pool_bytes)})")
    console.print(f"one layer ahead, on the first {len(sample):,} calibration tokens: recall {rec['plain']:.3f} (plain router) "
                  f"-> {rec['fitted']:.3f} (fitted)")


def _read_ids(tokenizer, inputs: list[str], max_tokens: int | None = None) -> list[int]:
    """The token ids of text files, one after the other; a clear error for a file that cannot be read or is empty."""
    ids: list[int] = []
    for name in inputs:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExpertPagerError(f"{name}: cannot read ({e})") from None
        tokens = tokenizer(text)["input_ids"][:max_tokens]
        if len(tokens) < 2:
            raise ExpertPagerError(f"{name}: no text in it")
        ids += tokens
    return ids


@app.command()
def prune(
    model: str = typer.Argument(..., help="Checkpoint to prune: an HF safetensors folder, a .gguf file, or cached org/name."),
    inputs: list[str] = typer.Option(None, "--input", help="Calibration text file (repeatable): the experts are scored on it; not the text you evaluate on."),
    keep: str = typer.Option(..., "--keep", help="Experts to keep in every MoE layer: a percentage (75%) or a count; at least the experts per token, fewer than all."),
    method: str = typer.Option("reap", "--method", help="reap: mean gate weight x output norm over the tokens routed to each expert; frequency: routing count; random: seeded."),
    per_domain: str = typer.Option(None, "--per-domain", help="A domain profile (`expertpager profile`; a name in the profiles folder or a .json): scores are weighted by how often that domain routes to each expert, so its experts are kept."),
    out: str = typer.Option(..., "--out", "-o", help="An HF folder to write (must not exist), or OUT.gguf."),
    out_type: str = typer.Option("f32", "--type", help="GGUF weight type when an HF checkpoint is written as OUT.gguf: f32, f16, bf16, q8_0, q4_0."),
    cache: str = typer.Option(None, "--cache", help="Expert cache while scoring, bytes or a percentage (default: every slice fits)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=2, help="Use at most this many tokens of each file."),
    seed: int = typer.Option(0, "--seed", help="Seed for --method random."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Remove the least useful experts of every MoE layer for deployment and write a standard checkpoint (HF folder
    or GGUF, loadable by transformers and llama.cpp), with a JSON map from new to original expert ids and the scores."""
    from .model.read_layout import read_layout
    from .runner import load_tokenizer
    from .runtime.profiles import default_profiles_dir, load_profile
    from .tools.prune import mapping_path, prune as prune_checkpoint

    layout = read_layout(model)
    ids = None
    if inputs:
        tokenizer = load_tokenizer(layout.path)
        if tokenizer is None:
            raise ExpertPagerError(f"{model}: scoring on text needs a tokenizer")
        ids = _read_ids(tokenizer, inputs, max_tokens)
    profile = None
    if per_domain:
        path = Path(per_domain) if per_domain.endswith(".json") else default_profiles_dir() / f"{per_domain}.json"
        if not path.exists():
            raise ExpertPagerError(f"{path}: no such profile (make one with `expertpager profile MODEL --input FILE --name NAME`)")
        profile = load_profile(path)
    info = prune_checkpoint(model, ids, keep, method, out, profile, seed, cache, out_type, progress=not json_out)
    summary = {"out": out, "mapping": str(mapping_path(out)), "method": method, "keep": info["keep"],
               "num_experts": info["num_experts"], "layers": len(info["layers"]), "calibration_tokens": info["calibration_tokens"]}
    if json_out:
        print(json.dumps(summary))
        return
    console.print(f"kept {info['keep']} of {info['num_experts']} experts in each of {len(info['layers'])} MoE layers "
                  f"({method}, {info['calibration_tokens']:,} calibration tokens) -> {out}; map: {summary['mapping']}")


@app.command()
def simulate(
    traces: list[str] = typer.Argument(..., help="Routing traces (.npz from tools.trace.save_trace)."),
    cache: str = typer.Option("10%,25%,50%", "--cache", help="Cache sizes as percentages of all expert bytes."),
    policy: str = typer.Option("lru,lfu,cycle,belady", "--policy", help="Policies: lru, lfu, cycle, belady."),
    prefetch: str = typer.Option("none", "--prefetch", help="none, temporal, next-layer or next-layer-N (top-k minus N; both need --model), or a comma list."),
    model: str = typer.Option(None, "--model", help="The traced model: slice sizes from its layout (else uniform), routers for next-layer."),
    json_out: bool = typer.Option(False, "--json", help='Print one JSON object {"rows": [...]}.'),
    plot_path: str = typer.Option(None, "--plot", help="Write a PNG per trace: hit rate and MB read per token vs cache size, per policy (Belady: the demand-only bound)."),
) -> None:
    """Replay recorded routing through the pager's cache policies: hit rate and bytes read per token."""
    from .tools.simulate import plot, rows_json, simulate as run_sim
    from .tools.trace import load_trace

    loaded = {Path(path).stem: load_trace(path) for path in traces}
    modes = [p.strip() for p in prefetch.split(",") if p.strip()]
    slices, predicted = 1 << 20, None
    if model is not None:
        from .model.read_layout import read_layout

        slices = read_layout(model).slices
        if "next-layer" in modes:
            from .tools.speculation import trace_speculation

            predicted = trace_speculation(model, loaded)
    rows = run_sim(loaded, _fractions(cache), [p.strip() for p in policy.split(",")], modes, slices, predicted)
    if plot_path:
        plot(rows, plot_path)
    if json_out:
        print(json.dumps(rows_json(rows)))
        return
    t = Table(title="simulated cache" + ("" if model else " (uniform slice sizes)"))
    for col in ("trace", "policy", "prefetch", "cache", "hit rate", "misses", "read per token"):
        t.add_column(col, justify="left" if col in ("trace", "policy", "prefetch") else "right")
    for r in rows:
        t.add_row(r.trace, r.policy, r.prefetch, f"{100 * r.cache_fraction:g}%", f"{r.hit_rate:.1%}", str(r.misses),
                  format_size(int(r.bytes_per_token)))
    console.print(t)


@app.command()
def profile(
    model: str = typer.Argument(None, help="Model to profile (default: the bundled demo MoE)."),
    input_file: str = typer.Option(None, "--input", help="Text file of the domain."),
    name: str = typer.Option(None, "--name", help="Profile name, e.g. code or prose."),
    out: str = typer.Option(None, "--out", help="Profiles folder (default: $EXPERTPAGER_PROFILES or ~/.cache/expertpager/profiles)."),
    compare_with: str = typer.Option(None, "--compare", help="Compare two stored profiles instead: A,B (names in the folder or .json paths)."),
    cache: str = typer.Option("50%", "--cache", help="Expert cache while profiling."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Store a domain's per-slice usage (JSON + heatmap PNG) for pre-warming, or compare two profiles."""
    from .runtime.profiles import default_profiles_dir, load_profile, save_profile
    from .tools.profile import build_profile, compare, heatmap

    folder = Path(out) if out else default_profiles_dir()
    if compare_with:
        names = [n.strip() for n in compare_with.split(",")]
        if len(names) != 2:
            raise ExpertPagerError(f"--compare takes two profiles A,B, got {compare_with!r}")
        a, b = (load_profile(n if n.endswith(".json") else folder / f"{n}.json") for n in names)
        if a.layers != b.layers or a.counts.shape != b.counts.shape:
            raise ExpertPagerError(f"profiles {a.name} and {b.name} come from models of different geometry")
        png = folder / f"{a.name}-vs-{b.name}.png"
        heatmap([a, b], str(png))
        info = {**compare(a, b), "heatmap": str(png)}
        if json_out:
            print(json.dumps(info))
            return
        t = Table(title=f"{a.name} vs {b.name}: cosine {info['cosine']:.3f}")
        for col in ("layer", "cosine", f"hot {info['hot_share']:.0%} overlap"):
            t.add_column(col, justify="right")
        for layer, c, j in zip(info["layers"], info["layer_cosine"], info["hot_jaccard"]):
            t.add_row(str(layer), f"{c:.3f}", f"{j:.2f}")
        console.print(t)
        console.print(f"heatmap: {png}")
        return
    if not input_file or not name:
        raise ExpertPagerError("profile needs --input FILE and --name NAME (or --compare A,B)")
    from .model.demo import demo_model_path
    from .model.read_layout import read_layout
    from .runner import load_tokenizer
    from .runtime.load import load

    ref = model or str(demo_model_path())
    tokenizer = load_tokenizer(read_layout(ref).path)
    if tokenizer is None:
        raise ExpertPagerError(f"{ref}: profiling text needs a tokenizer")
    try:
        text = Path(input_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExpertPagerError(f"{input_file}: cannot read ({e})") from None
    m = load(ref, cache=cache)
    p = build_profile(m, tokenizer(text)["input_ids"], name, str(ref))
    m.pager.close()
    path, png = folder / f"{name}.json", folder / f"{name}.png"
    save_profile(p, path)
    heatmap([p], str(png))
    info = {"name": name, "tokens": p.tokens, "profile": str(path), "heatmap": str(png)}
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"profile [bold]{name}[/bold]: {p.tokens} tokens -> {path}, heatmap {png}")
def _model_and_ids(model: str | None, input_file: Path | None, prompt: str | None, cache: str | None):
    """The model (resident, or paged when a cache is given) and the text's token ids."""
    import torch

    from .model.demo import demo_model_path
    from .model.read_layout import read_layout
    from .runner import load_tokenizer, open_model

    ref = model or str(demo_model_path())
    if (input_file is None) == (prompt is None):
        raise ExpertPagerError("give exactly one of --input FILE or --prompt TEXT")
    if input_file is not None:
        try:
            prompt = input_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ExpertPagerError(f"{input_file}: cannot read text ({e})") from None
    tokenizer = load_tokenizer(read_layout(ref).path)
    if tokenizer is None:
        raise ExpertPagerError(f"{ref}: this checkpoint has no tokenizer")
    ids = torch.tensor(tokenizer(prompt)["input_ids"])
    if ids.numel() < 2:
        raise ExpertPagerError("the text must be at least two tokens long")
    return open_model(ref, resident=cache is None, cache=cache), ids


@app.command()
def trace(
    model: str = typer.Argument(None, help="Model folder, .gguf or cached org/name; default: the bundled demo MoE."),
    input_file: Path = typer.Option(None, "--input", "-i", help="A text file to run through the model."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to run through the model."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the trace (.npz; format in expertpager/tools/trace.py)."),
    domain: str = typer.Option("", "--domain", help="A label stored in the trace, e.g. code or prose."),
    window: int = typer.Option(256, "--window", min=2, help="Tokens per independent window."),
    cache: str = typer.Option(None, "--cache", help="Run paged with this expert cache (default: fully resident)."),
) -> None:
    """Record, per token and per MoE layer, the top-k experts the router chose and their weights."""
    from .tools.trace import record_trace, save_trace

    m, ids = _model_and_ids(model, input_file, prompt, cache)
    t = record_trace(m, ids, chunk=window, domain=domain, source=str(input_file or "prompt"))
    tmp = out.with_name(f".{out.name}.partial")
    save_trace(t, tmp)
    tmp.replace(out)
    console.print(f"{t.num_tokens} tokens x {len(t.layers)} MoE layers x top-{t.top_k} -> {out}")


@app.command(name="eval")
def evaluate(
    model: str = typer.Argument(None, help="Model folder, .gguf or cached org/name; default: the bundled demo MoE."),
    input_file: Path = typer.Option(None, "--input", "-i", help="A text file to score."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to score."),
    window: int = typer.Option(256, "--window", min=2, help="Tokens per independent window."),
    cache: str = typer.Option(None, "--cache", help="Run paged with this expert cache (default: fully resident)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Next-token loss and perplexity of a text (held-out evaluation)."""
    from .tools.evaluate import evaluate_loss

    m, ids = _model_and_ids(model, input_file, prompt, cache)
    loss, ppl, n = evaluate_loss(m, ids, window)
    if json_out:
        print(json.dumps({"loss": loss, "perplexity": ppl, "tokens": n}))
    else:
        console.print(f"loss {loss:.4f} nats, perplexity {ppl:.2f}, over {n} predicted tokens")


def main() -> None:
    """Entry point: run the app, turning ExpertPagerError into one line on stderr and exit code 2. The command line
    shows the project's own progress bars only: transformers' (and huggingface_hub's) are off in this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except ExpertPagerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@app.command()
def export(
    model: str = typer.Argument(..., help="An HF safetensors MoE checkpoint (folder or cached org/name)."),
    out: str = typer.Argument(..., help="The .gguf file to write."),
    out_type: str = typer.Option("f32", "--type", help="Weight type: f32, f16, bf16, q8_0, q4_0 (norms and routers stay f32)."),
) -> None:
    """Write a checkpoint as a standard GGUF (llama.cpp's tensor names and metadata)."""
    from .tools.export_gguf import export_gguf

    path = export_gguf(model, out, out_type)
    console.print(f"wrote {path}")


@app.command()
def repack(
    model: str = typer.Argument(..., help="A checkpoint: safetensors folder, .gguf file, or repacked folder."),
    outdir: str = typer.Argument(..., help="The folder to write (must not exist)."),
    files: str = typer.Option("single", "--files", help="Expert files: single, per-layer, or per-slice."),
    compact: bool = typer.Option(False, "--compact", help="Store a quantized GGUF's slices transcoded to the compact tier (int4/int8 with bf16 scales): page-in is then one read with no transcode, at about 1.14x the stored bytes."),
    quantize: str = typer.Option(None, "--quantize", help="int4 or int8: store a float checkpoint's slices quantized in the compact tier (as run --quantize does at page-in)."),
) -> None:
    """Rewrite a checkpoint so every expert slice is one aligned, checksummed read."""
    from .tools.repack import repack as repack_checkpoint

    path = repack_checkpoint(model, outdir, files, compact=compact, quantize=quantize)
    console.print(f"wrote {path}")


def _profile_for(path: str, layout):
    from .runtime.profiles import load_profile

    p = load_profile(path)
    if p.layers != list(layout.moe_layers) or p.counts.shape[1] != layout.num_experts:
        raise ExpertPagerError(f"{path}: profile {p.name!r} is of a model with other MoE layers or experts than this one")
    return p


@app.command()
def pull(
    model: str = typer.Argument(..., help="A remote model: hf://org/name[@rev][:QUANT], https://.../model.gguf or a folder URL."),
    profile_path: str = typer.Option(None, "--profile", help="A domain profile (see `expertpager profile`): also fetch its hottest slices, as many as the disk budget holds."),
    everything: bool = typer.Option(False, "--all", help="Fetch every expert slice (the disk budget must hold them all)."),
    disk: str = DISK,
    store: str = STORE,
    threads: int = typer.Option(4, "--threads", min=1, help="Parallel range requests."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Fetch a remote model's headers and resident tensors into its local store ahead of time, and with --profile the
    hottest expert slices of a domain (--all: every slice), so later runs (even offline) find them on disk. Each weight
    file the store then holds whole is checked against the SHA-256 the server publishes (the Hub does for LFS files),
    once; a file that disagrees loses its slices and the command fails."""
    from .progress import progress_bar
    from .remote import is_remote, open_store

    if not is_remote(model):
        raise ExpertPagerError(f"{model}: pull takes a remote model (hf://..., https://...); a local one is already on disk")
    if everything and profile_path:
        raise ExpertPagerError("give --all or --profile, not both")
    s = open_store(model, store, parse_size(disk) if disk else None, offline=False)
    s.fetch_resident(progress=not json_out)
    keys = sorted(s.layout.slices) if everything else []
    if everything and s.disk is not None and (need := s.fixed_bytes + sum(map(s.slice_size, keys))) > s.disk:
        raise ExpertPagerError(f"{s.folder}: the disk budget of {s.disk:,} bytes cannot hold every slice ({need:,} bytes "
                               "with the resident tensors and headers); raise --disk or pull a --profile")
    if profile_path:
        p = _profile_for(profile_path, s.layout)
        largest = max(s.slice_size(k) for k in s.layout.slices)
        room = len(s.layout.slices) if s.disk is None else max(0, (s.disk - s.used_bytes) // largest)
        present = set(s.present())
        for k in p.hottest(int((p.counts > 0).sum())):
            if k not in present and not room:
                break
            keys.append(k)
            room -= k not in present
        keys.reverse()  # the hottest last, so they are the most recently used and the last the store evicts
    with progress_bar("fetching slices", len(keys), enabled=not json_out and bool(keys)) as advance:
        fetched = s.fetch_many(keys, threads, advance)
    verified = s.verify_files(progress=not json_out)
    info = {"model": model, "store": str(s.folder), "slices_fetched": fetched, "slices_in_store": len(s.present()),
            "num_slices": len(s.layout.slices), "files_verified": verified, **s.stats().to_dict()}
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"{model} -> {s.folder}: resident tensors and {info['slices_in_store']} of {info['num_slices']} slices "
                  f"({format_size(info['store_bytes'])} on disk); fetched {format_size(info['remote_bytes'])} "
                  f"in {info['remote_seconds']:.1f} s" + (f"; SHA-256 checked: {', '.join(verified)}" if verified else ""))


@app.command()
def plan(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ram: str = typer.Option(None, "--ram", help="Memory promise for the whole process, e.g. 8GB."),
    cache: str = typer.Option(None, "--cache", help="Or the expert cache directly: bytes or a percentage of all expert bytes (25%), as `run --cache`."),
    disk: str = typer.Option(None, "--disk", help="Disk budget of a remote model's store (default: unlimited)."),
    profile_path: str = typer.Option(None, "--profile", help="A domain profile: misses from its slice popularity."),
    trace_path: str = typer.Option(None, "--trace", help="A routing trace (.npz): misses replayed through the cache."),
    policy: str = typer.Option("lru", "--policy", help="Cache policy for --trace replay: lru, lfu, cycle."),
    compute_tps: float = typer.Option(None, "--compute-tps", help="Decode tokens/s with every slice in RAM (e.g. from `run --cache 100%`); default: the memory-bandwidth bound."),
    disk_gbps: float = typer.Option(None, "--disk-gbps", help="Disk read bandwidth in GB/s (default: measured)."),
    net_gbps: float = typer.Option(None, "--net-gbps", help="Network bandwidth in GB/s (default: measured on the remote)."),
    latency_ms: float = typer.Option(None, "--latency-ms", help="Network request latency in ms (default: measured)."),
    store: str = STORE,
    offline: bool = OFFLINE,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Plan a fit from headers only: what fits in --ram (and a remote model's store in --disk), the RAM cache's hit
    rate, bytes per token from disk and network, and a predicted decode speed from measured bandwidths."""
    from .remote import resolve_layout
    from .tools.fit import Bandwidths, disk_bandwidth, memory_bandwidth, plan_fit

    if profile_path and trace_path:
        raise ExpertPagerError("give --profile or --trace, not both")
    if (ram is None) == (cache is None):
        raise ExpertPagerError("give exactly one of --ram SIZE (the whole process) or --cache SIZE|PCT")
    disk_bytes = parse_size(disk) if disk else None
    layout, remote = resolve_layout(model, store, None, offline)
    prof = _profile_for(profile_path, layout) if profile_path else None
    tr = None
    if trace_path:
        from .tools.trace import load_trace

        tr = load_trace(trace_path)
        if [int(l) for l in tr.layers] != list(layout.moe_layers) or tr.num_experts != layout.num_experts:
            raise ExpertPagerError(f"{trace_path}: the trace is of a model with other MoE layers or experts than this one")
    if remote is None:
        disk_rate = disk_gbps * 1e9 if disk_gbps else disk_bandwidth(layout)
        bw = Bandwidths(disk_rate, memory_bandwidth())
        fixed = 0
    else:
        disk_rate = disk_gbps * 1e9 if disk_gbps else disk_bandwidth(folder=str(remote.folder))
        net, latency = (None, None) if net_gbps and latency_ms is not None else remote.measure_network()
        bw = Bandwidths(disk_rate, memory_bandwidth(), net_gbps * 1e9 if net_gbps else net,
                        latency_ms / 1e3 if latency_ms is not None else latency)
        fixed = remote.fixed_bytes
    fit = plan_fit(layout, ram, disk_bytes, remote is not None, bw, prof, tr, compute_tps, policy,
                   fixed_disk_bytes=fixed, cache=cache)
    info = {"model": model, **fit.to_dict()}
    if json_out:
        print(json.dumps(info))
        return
    t = Table(title=f"plan for {model}", show_header=False)
    rows = [("RAM", f"expert cache {format_size(fit.cache_bytes)}") if fit.ram is None else ("RAM", f"{format_size(fit.ram)} = resident {format_size(fit.resident_bytes)} + reserve "
                    f"{format_size(fit.reserve_bytes)} + cache {format_size(max(fit.cache_bytes, 0))}"),
            ("fits", "yes" if fit.fits else "no: the cache cannot hold one layer's top-k slices"),
            ("cache", f"{fit.cache_slices} of {fit.num_slices} slices ({fit.cache_fraction:.1%})"),
            ("expert bytes per token", format_size(fit.bytes_per_token)),
            (f"hit rate ({fit.routing})", f"{fit.hit_rate:.1%}"),
            ("RAM misses per token", format_size(fit.miss_bytes_per_token))]
    if remote is not None:
        held = "all" if fit.store_slices == fit.num_slices else f"{fit.store_slices}"
        rows += [("store on disk", f"{held} slices ({'unlimited' if disk_bytes is None else format_size(disk_bytes)})"),
                 ("misses served from disk", f"{fit.store_share:.1%}"),
                 ("network per token", f"{format_size(fit.network_bytes_per_token)} "
                                       f"({fit.network_requests_per_token:.2f} requests)")]
    b = fit.bandwidths
    rows += [("bandwidth", f"disk {b['disk'] / 1e9:.2f} GB/s, memory {b['memory'] / 1e9:.1f} GB/s"
                           + (f", network {b['network'] / 1e9:.3f} GB/s, latency {b['latency'] * 1e3:.1f} ms" if remote else "")),
             ("compute alone", f"{fit.compute_tokens_per_s:.1f} tokens/s"),
             ("predicted decode", f"{fit.predicted_tokens_per_s:.2f} tokens/s")]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
