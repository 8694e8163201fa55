"""Replay recorded routing traces through the pager's own cache bookkeeping and policies (`replay_steps`), with
or without prefetching, for several cache sizes: hit rate and bytes read per token, as rows and a plot."""

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, SliceKey
from ..pager import Step, replay_steps
from ..pager.reads import BLOCK
from ..pager.replay import slot_needs
from ..runtime.moe_layers import MoeLayer
from ..runtime.predictors import Routed, Temporal
from .trace import Trace

PREFETCH = ("none", "temporal", "next-layer", "next-layer-N")
NEXT_LAYER = re.compile(r"next-layer(?:-(\d+))?$")


@dataclass
class Row:
    trace: str
    policy: str
    prefetch: str
    cache_fraction: float
    hit_rate: float
    misses: int
    bytes_per_token: float
    prefetch_issued: int


def trace_steps(trace: Trace, prefetch: str = "none", predicted: np.ndarray | None = None) -> list[Step]:
    """One step per token and MoE layer, its experts pinned together as the paged module pins them (sorted), with
    the prefetches the live predictor would queue then: `temporal` runs the runtime's Temporal predictor;
    `next-layer` takes `predicted` [T, M, 1+, k'] from `speculation` (one layer ahead), `next-layer-N` its first
    k' - N (the likeliest, as the fitted maps and the routers list them highest first)."""
    nl = NEXT_LAYER.match(prefetch)
    if nl:
        predicted = predicted[..., : predicted.shape[-1] - int(nl.group(1) or 0)]
    layers = [int(l) for l in trace.layers]
    temporal = Temporal()
    temporal.start([MoeLayer(l, None, None, None) for l in layers], trace.num_experts, 0)
    steps = []
    for t in range(trace.num_tokens):
        for m, layer in enumerate(layers):
            experts = sorted(set(trace.experts[t, m].tolist()))
            ahead: list[SliceKey] = []
            if prefetch == "temporal":
                ahead = temporal.routed(Routed(layer, experts, None))
            elif nl and m + 1 < len(layers):
                ahead = [(layers[m + 1], int(e)) for e in dict.fromkeys(predicted[t, m, 0].tolist())]
            steps.append(Step(tuple((layer, e) for e in experts), tuple(ahead)))
    return steps


def simulate(traces: dict[str, Trace], fractions: Sequence[float], policies: Sequence[str],
             prefetch: Sequence[str] = ("none",), slices: dict[SliceKey, ExpertSlice] | int = 1 << 20,
             predicted: dict[str, np.ndarray] | None = None) -> list[Row]:
    """Rows for every trace x prefetch x policy x cache fraction. The budget is `fraction` of all slices' slot
    bytes; `slices` is the model layout's slices (one int: every slice that many bytes). Belady (the demand-only
    offline optimum) runs once per trace, without prefetch."""
    rows = []
    for name, trace in traces.items():
        keys = [(int(l), e) for l in trace.layers for e in range(trace.num_experts)]
        if isinstance(slices, int):
            table, total = dict.fromkeys(keys, slices), len(keys) * -(-slices // BLOCK) * BLOCK
        else:
            table = {k: slices[k] for k in keys}
            total = sum(slot_needs(table).values())
        for pf in prefetch:
            nl = NEXT_LAYER.match(pf)
            if pf not in PREFETCH and not (nl and 0 < int(nl.group(1)) < trace.top_k):
                raise ExpertPagerError(f"unknown prefetch {pf!r}: use one of {', '.join(PREFETCH)} (N < top-k)")
            if nl and (predicted is None or name not in predicted):
                raise ExpertPagerError("--prefetch next-layer needs the model (--model) to run its routers")
            steps = trace_steps(trace, pf, (predicted or {}).get(name))
            for policy in policies:
                if policy == "belady" and pf != prefetch[0]:
                    continue
                for fraction in fractions:
                    use = trace_steps(trace) if policy == "belady" else steps
                    r = replay_steps(use, table, int(fraction * total), policy, trace.top_k)
                    rows.append(Row(name, policy, "none" if policy == "belady" else pf, fraction, r.hit_rate,
                                    r.misses, r.bytes_read / trace.num_tokens, r.prefetch_issued))
    return rows


def rows_json(rows: list[Row]) -> dict:
    """{"rows": [...]} for --json."""
    return {"rows": [asdict(r) for r in rows]}


METRICS = (("hit_rate", "hit rate", 1.0), ("bytes_per_token", "MB read per token", 1e-6))  # field, axis, scale


def figure(rows: list[Row]):
    """A matplotlib figure of `rows`: per trace, hit rate (top) and bytes read per token (bottom) vs cache size, one
    line per policy (and prefetch). Prefetch raises both; Belady (dashed) is the bound for demand loading only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r.trace for r in rows))
    policies = [p for p in dict.fromkeys(r.policy for r in rows) if p != "belady"]
    colors = {p: f"C{i % 10}" for i, p in enumerate(policies)} | {"belady": "black"}
    styles = ["-o", ":s", "-.^", "--v", ":D"]  # one per prefetch setting; colour per policy
    prefetches = {pf: styles[i % len(styles)] for i, pf in enumerate(dict.fromkeys(r.prefetch for r in rows))}
    fig, axes = plt.subplots(len(METRICS), len(traces), figsize=(5.5 * len(traces), 7.5), squeeze=False)
    for column, name in enumerate(traces):
        mine = [r for r in rows if r.trace == name]
        for ax, (field, axis, scale) in zip(axes[:, column], METRICS):
            for label in dict.fromkeys((r.policy, r.prefetch) for r in mine):
                pts = sorted((r.cache_fraction, getattr(r, field) * scale) for r in mine if (r.policy, r.prefetch) == label)
                text = ("belady (demand-only bound)" if label[0] == "belady" else label[0] if label[1] == "none"
                        else f"{label[0]} + {label[1]}")
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts],
                        "--" if label[0] == "belady" else prefetches[label[1]], color=colors[label[0]], label=text)
            ax.set(title=name, xlabel="cache (% of expert bytes)", ylabel=axis)
            ax.set_ylim(bottom=0, top=1 if field == "hit_rate" else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[Row], path: str) -> None:
    """Write `figure(rows)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
