"""The `expertpager` command line: parse, call, print. Errors are one line on stderr and exit code 2."""

import json
import sys

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


def main() -> None:
    """Entry point: run the app, turning ExpertPagerError into one line on stderr and exit code 2."""
    try:
        app()
    except ExpertPagerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
