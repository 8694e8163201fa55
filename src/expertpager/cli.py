"""The `expertpager` command line: parse, call, print. Errors are one line on stderr and exit code 2."""

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import ExpertPagerError
from .sizes import format_size, parse_size

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run mixture-of-experts models larger than memory by paging expert slices from disk.")
console = Console()


@app.callback()
def _root() -> None:
    """Run mixture-of-experts models larger than memory by paging expert slices from disk."""


@app.command()
def inspect(
    model: str = typer.Argument(..., help="A model folder (config.json + *.safetensors), a .gguf file, or org/name[@rev][:QUANT] from the local HF cache."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    max_memory: str = typer.Option(None, "--max-memory", help="Memory promise for the whole process, e.g. 8GB (10^9) or 8GiB (2^30): show how big an expert cache fits."),
) -> None:
    """Show a checkpoint's MoE geometry and what each part costs in bytes, reading headers only."""
    from .model.read_layout import read_layout
    from .report import describe

    info = describe(read_layout(model), parse_size(max_memory) if max_memory else None)
    if json_out:
        print(json.dumps(info))
        return
    _print_inspect(info)


def _print_inspect(info: dict) -> None:
    t = Table(title=f"{info['path']}", show_header=False)
    rows = [
        ("architecture", f"{info['architecture']} ({info['format']}, {info['files']} file(s))"),
        ("layers", f"{info['num_layers']} ({info['num_moe_layers']} MoE, dense: {info['dense_layers'] or 'none'})"),
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
ADAPTER_ROWS = (("adapter piece hit rate", "adapter_hit_rate", "{:.1%}"), ("adapter bytes read", "adapter_bytes_read", "size"))


def _stats_table(columns: dict[str, dict]) -> Table:
    t = Table(title="stats")
    t.add_column("")
    for name in columns:
        t.add_column(name, justify="right")
    rows = STAT_ROWS + (ADAPTER_ROWS if any("adapter_hit_rate" in c for c in columns.values()) else ())
    for label, key, fmt in rows:
        cells = [format_size(c.get(key, 0)) if fmt == "size" else fmt.format(c.get(key, 0)) for c in columns.values()]
        t.add_row(label, *cells)
    return t


@app.command()
def run(
    model: str = typer.Argument(None, help="Model folder, .gguf file or cached org/name; default: the bundled demo MoE."),
    prompt: str = typer.Option(None, "--prompt", "-p", help=f"Prompt text (default: {DEFAULT_PROMPT!r})."),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt as token ids, e.g. 1,2,3 (for checkpoints without a tokenizer)."),
    chat: bool = typer.Option(False, "--chat", help="Read user turns from stdin and answer with the model's chat template."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    max_memory: str = typer.Option(None, "--max-memory", help="Memory promise for the whole process (resident + reserve + cache), e.g. 8GB."),
    cache: str = typer.Option(None, "--cache", help="Expert cache size: bytes (2GB, 512MiB) or a percentage of all expert bytes (25%)."),
    policy: str = typer.Option("lru", "--policy", help="Eviction policy: lru, lfu, cycle."),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", help="Load the next chunk of experts while one computes."),
    predictor: str = typer.Option(None, "--predictor", help="Prefetch predictors, comma-separated: next-layer[:AHEAD][+EXTRA|-FEWER] (e.g. next-layer+4: top-k+4; next-layer-2: top-k-2), temporal, domain."),
    profiles: str = typer.Option(None, "--profiles", help="Folder of domain profiles for --predictor domain (see `expertpager profile`)."),
    speculator: str = typer.Option(None, "--speculator", help="Fitted maps for --predictor next-layer (see `expertpager calibrate`): a .safetensors file, or none for the plain routers; default: the model folder's speculator.safetensors when present."),
    resident: bool = typer.Option(False, "--resident", help="Run the same model fully in memory with plain transformers."),
    compare: bool = typer.Option(False, "--compare", help="Run fully resident and paged, one after the other, and show both."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    seed: int = typer.Option(0, "--seed"),
    io: str = typer.Option("auto", "--io", help="Page-in I/O: auto, direct (O_DIRECT), buffered+dontneed, buffered."),
    expert_cache: str = typer.Option("auto", "--expert-cache",
                                     help="What the cache holds for quantized slices: compact (int4/int8 at about the stored size, bfloat16 compute; the default for a quantized GGUF), dequantized (decoded once at page-in) or raw (decoded on every use). auto picks compact where it applies."),
    quantize: str = typer.Option(None, "--quantize", help="int4 or int8: hold a bf16/f16/f32 checkpoint's experts in the compact tier (round to nearest per 32 weights, or per row), bfloat16 compute."),
    adapter: list[str] = typer.Option(None, "--adapter", help="A PEFT LoRA adapter folder, as PATH or NAME=PATH (name: the folder's); repeat for several. Its expert LoRA is paged through the same cache."),
    use_adapter: str = typer.Option(None, "--use-adapter", help="The adapter this run uses, by name (default: the first --adapter; none: the base model)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: tokens, text, stats."),
) -> None:
    """Generate text with expert slices paged from disk under a memory budget (greedy by default)."""
    from .model.demo import demo_model_path
    from .model.read_layout import read_layout
    from .runner import adapter_choice, load_tokenizer, open_model, parse_adapters, run_once

    ref = model or str(demo_model_path())
    tokenizer = load_tokenizer(read_layout(ref).path)
    adapters = parse_adapters(adapter or [])
    options = dict(max_memory=max_memory, cache=cache, policy=policy, prefetch=prefetch, io=io, expert_cache=expert_cache,
                   predictors=predictor, profiles=profiles, speculator=False if speculator == "none" else speculator,
                   progress=not json_out, quantize=quantize, adapters=adapters, adapter=adapter_choice(adapters, use_adapter))
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
    from .runner import open_model, run_once

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ExpertPagerError(f"{ref}: --chat needs a tokenizer with a chat template; use --prompt")
    m = open_model(ref, resident, **options)
    messages = []
    for line in sys.stdin:
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
        result = run_once(m, ids, max_new_tokens, temperature, seed, tokenizer, _streamer(tokenizer))
        console.print()
        messages.append({"role": "assistant", "content": result.text or ""})


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
    from .tools.calibrate import calibrate as fit, windows
    from .progress import progress_bar
    from .tools.speculation import recall_precision, speculation

    layout = read_layout(model)
    tokenizer = load_tokenizer(layout.path)
    if tokenizer is None:
        raise ExpertPagerError(f"{model}: calibrating on text needs a tokenizer")
    ids: list[int] = []
    for name in inputs:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExpertPagerError(f"{name}: cannot read ({e})") from None
        tokens = tokenizer(text)["input_ids"][:max_tokens]
        if len(tokens) < 2:
            raise ExpertPagerError(f"{name}: no text to calibrate on")
        ids += tokens
    path = Path(output) if output else default_speculator_path(layout.path)
    if not path.parent.is_dir():
        raise ExpertPagerError(f"{path}: its folder does not exist")
    m = load(model, cache=cache)
    with progress_bar("calibrating", windows(len(ids)), enabled=not json_out) as advance:
        spec = fit(m, ids, ahead=ahead, shrink=shrink, on_window=advance)
    sample = np.array(ids[:4096])
    actual, plain = speculation(m, sample, lookahead=1)
    fitted = speculation(m, sample, lookahead=1, speculator=spec)[1]
    m.pager.close()
    save_speculator(spec, path)
    rec = {name: float(np.nanmean(recall_precision(actual, p)[0][:, 0])) for name, p in (("plain", plain), ("fitted", fitted))}
    info = {"speculator": str(path), "tokens": len(ids), "ahead": spec.ahead, "layers": spec.layers,
            "recall_plain": round(rec["plain"], 4), "recall_fitted": round(rec["fitted"], 4), "recall_tokens": len(sample)}
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"speculator for {len(spec.layers)} MoE layers, distances {spec.ahead}, from {len(ids):,} tokens -> {path}")
    console.print(f"one layer ahead, on the first {len(sample):,} calibration tokens: recall {rec['plain']:.3f} (plain router) "
                  f"-> {rec['fitted']:.3f} (fitted)")


@app.command()
def simulate(
    traces: list[str] = typer.Argument(..., help="Routing traces (.npz from tools.trace.save_trace)."),
    cache: str = typer.Option("10%,25%,50%", "--cache", help="Cache sizes as percentages of all expert bytes."),
    policy: str = typer.Option("lru,lfu,cycle,belady", "--policy", help="Policies: lru, lfu, cycle, belady."),
    prefetch: str = typer.Option("none", "--prefetch", help="none, temporal, next-layer or next-layer-N (top-k minus N; both need --model), or a comma list."),
    model: str = typer.Option(None, "--model", help="The traced model: slice sizes from its layout (else uniform), routers for next-layer."),
    json_out: bool = typer.Option(False, "--json", help='Print one JSON object {"rows": [...]}.'),
    plot_path: str = typer.Option(None, "--plot", help="Write a PNG of hit rate vs cache size per policy."),
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
    """Entry point: run the app, turning ExpertPagerError into one line on stderr and exit code 2."""
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
