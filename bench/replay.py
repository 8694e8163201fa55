"""Recorded (or synthetic skewed) routing driven through real page-in and real expert compute at a realistic
slice size, comparing at one cache size: no cache, LRU, the best policy, the best policy + prefetch, and every
slice resident. Run by hand:

    PYTHONPATH=src python bench/replay.py [--trace T.npz [--model DIR]] [--prefetch next-layer,next-layer-2]
        [--cache 25%] [--tokens 64] [--warmup 64] [--rounds 3] [--threads 4]

Writes a scratch file of bf16 expert slices (gate, up, down of hidden x inter; default 2048 x 384 = 4.7 MB, between
Qwen3-30B-A3B's 2.7 MB at Q4 and 9.4 MB at bf16), one per (layer, expert) of the trace, deleted at the end. Each
token pins its experts layer by layer with `pin_each` (io=direct: every miss is a disk read) and multiplies by
each as soon as it is ready (gate/up, SiLU, down; one thread), as the runtime does. "best" is the policy with the
fewest misses when the same trace is replayed (`simulate`) without prefetch; "best + P" adds each prefetch setting P
(next-layer: the model's speculator or routers on the trace's tokens, top-k; next-layer-N: top k-N; temporal), its
slices queued with the layer's pin, behind the layer's own loads. Prefetches still queued when the next layer pins
are cancelled, as the runtime does. Every mode runs `--rounds` times, in alternating order; medians are reported.
Warm-up tokens run first, untimed, so the timed tokens see a cache in its steady state. "waits/Belady": pins that
waited for a read (misses, and joins of a prefetch still in flight) over Belady's misses on the same timed tokens
(demand paging with the future known, replayed). Prints a table, then one JSON line.
"""

import argparse
import json
import os
import time

import torch

from expertpager.model.layout import ExpertSlice, TensorPart
from expertpager.pager import SliceCache, replay_steps
from expertpager.runtime.paged_experts import slice_tensors
from expertpager.tools.simulate import simulate, trace_steps
from expertpager.tools.speculation import trace_speculation
from expertpager.tools.skewed_routing import skewed_trace
from expertpager.tools.trace import load_trace

MB = 10**6


def write_slices(path: str, layers: list[int], experts: int, hidden: int, inter: int) -> dict:
    """A file of bf16 slices, each gate [I,H], up [I,H], down [H,I] back to back; returns the ExpertSlices."""
    n = inter * hidden
    block = (torch.randn(3 * n) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
    slices, pos = {}, 0
    with open(path, "wb") as f:
        for layer in layers:
            for e in range(experts):
                block[:2] = (layer * experts + e) % 256  # no two slices identical
                f.write(block.data)
                parts = (TensorPart("gate", path, pos, 2 * n, "BF16", (inter, hidden)),
                         TensorPart("up", path, pos + 2 * n, 2 * n, "BF16", (inter, hidden)),
                         TensorPart("down", path, pos + 4 * n, 2 * n, "BF16", (hidden, inter)))
                slices[(layer, e)] = ExpertSlice(layer, e, parts)
                pos += 6 * n
        f.flush()
        os.fsync(f.fileno())
    return slices


def expert_forward(x: torch.Tensor, sl: ExpertSlice, buf) -> torch.Tensor:
    """One expert on one token: SiLU(x gate^T) * (x up^T), then down."""
    w = slice_tensors(sl, buf.views, torch.bfloat16)
    gate, up = torch.nn.functional.linear(x, w["gate_up"]).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w["down"])


def run(name: str, slices: dict, budget: int, policy: str, steps: list, warmup: int, per_token: int, k: int,
        prefetch: bool, preload: bool, hidden: int, threads: int = 4) -> dict:
    """Decode the steps on a fresh (cold) cache; time the steps after the warm-up tokens."""
    with SliceCache(slices, budget, policy, io="direct", threads=threads, min_pinned=k) as cache:
        if preload:
            keys = list(slices)
            for i in range(0, len(keys), cache.num_slots):
                cache.pin_many(keys[i:i + cache.num_slots]).release()
        x = torch.randn(1, hidden).to(torch.bfloat16)
        start, base = None, None
        for i, step in enumerate(steps):
            if i == warmup * per_token:
                start, base = time.perf_counter(), cache.stats_snapshot()
            if prefetch:
                cache.cancel_prefetches()
            with cache.pin_each(step.keys, step.prefetch if prefetch else ()) as stream:
                outs = {key: expert_forward(x, slices[key], buf) for key, buf in stream}  # each as soon as it is read
            out = sum(outs[key] for key in step.keys)
            x = (out / out.float().norm().clamp_min(1e-6)).to(torch.bfloat16)
        seconds = time.perf_counter() - start
        s = cache.stats_snapshot()
        tokens = len(steps) // per_token - warmup
        pins = (s.hits + s.joins + s.misses) - (base.hits + base.joins + base.misses)
        return {"mode": name, "policy": policy, "prefetch": prefetch, "tokens_per_s": tokens / seconds,
                "hit_rate": (s.hits - base.hits) / pins, "waits": (s.misses - base.misses) + (s.joins - base.joins), "mb_read_per_token": (s.bytes_read - base.bytes_read) / tokens / MB,
                "stall_s": s.stall_seconds - base.stall_seconds, "seconds": seconds, "cache_mb": cache.pool_bytes / MB}


def json_key(row: dict) -> str:
    return row["mode"].replace(" + ", "_").replace(" ", "_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", help="routing trace .npz (default: synthetic skewed routing, 8 layers x 64 experts, top-8)")
    ap.add_argument("--model", help="the traced model: adds next-layer prefetch (its speculator, or routers, on its hidden states)")
    ap.add_argument("--prefetch", help="prefetch settings to time, comma-separated (default: next-layer,next-layer-2 "
                                       "with --model, else temporal)")
    ap.add_argument("--cache", default="25%")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="runs of every mode, in alternating order; medians reported")
    ap.add_argument("--threads", type=int, default=4, help="the cache's I/O workers (the runtime's default is 4)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=384)
    ap.add_argument("--path", default="/tmp/expertpager-bench-replay.bin")
    args = ap.parse_args()
    torch.set_num_threads(1)
    total_tokens = args.tokens + args.warmup
    if args.trace:
        trace = load_trace(args.trace)
        trace.experts, trace.tokens = trace.experts[:total_tokens], trace.tokens[:total_tokens]
    else:
        trace = skewed_trace(total_tokens, 8, 64, 8, seed=1)
    predicted = trace_speculation(args.model, {"trace": trace}) if args.model else None
    prefetch = (args.prefetch or ("next-layer,next-layer-2" if predicted else "temporal")).split(",")
    layers = [int(l) for l in trace.layers]
    fraction = float(args.cache.rstrip("%")) / 100
    slot = 6 * args.hidden * args.inter
    rows = simulate({"trace": trace}, [fraction], ["lru", "lfu", "cycle"], ["none"] + prefetch, slot, predicted)
    best = min((r for r in rows if r.prefetch == "none"), key=lambda r: r.misses).policy
    print(f"replayed at {args.cache}: " + ", ".join(f"{r.policy}+{r.prefetch} {r.hit_rate:.1%}" for r in rows))
    k = trace.top_k
    print(f"writing {len(layers) * trace.num_experts} slices of {slot / MB:.1f} MB to {args.path}")
    slices = write_slices(args.path, layers, trace.num_experts, args.hidden, args.inter)
    all_bytes = slot * len(slices)
    budget = int(fraction * all_bytes)
    plain = trace_steps(trace)
    modes = [("no cache", k * slot, "lru", plain, False, False), ("lru", budget, "lru", plain, False, False),
             ("best", budget, best, plain, False, False)]
    modes += [(f"best + {pf}", budget, best, trace_steps(trace, pf, (predicted or {}).get("trace")), True, False)
              for pf in prefetch]
    modes.append(("resident", all_bytes, "lru", plain, False, True))
    runs: dict[str, list[dict]] = {m[0]: [] for m in modes}
    try:
        for i in range(args.rounds):
            for name, size, policy, steps, pf, preload in modes if i % 2 == 0 else modes[::-1]:
                runs[name].append(run(name, slices, size, policy, steps, warmup=args.warmup, per_token=len(layers),
                                      k=k, prefetch=pf, preload=preload, hidden=args.hidden, threads=args.threads))
    finally:
        os.remove(args.path)
    results = [sorted(runs[m[0]], key=lambda r: r["tokens_per_s"])[args.rounds // 2] for m in modes]
    belady = replay_steps(plain, slot, budget, "belady", k, warmup=args.warmup * len(layers)).misses
    print(f"Belady (demand only, same timed tokens): {belady} misses; median of {args.rounds} rounds "
          f"(tok/s of every round in brackets)")
    print(f"{'mode':<26}{'policy':<8}{'tok/s':>8}{'hit rate':>10}{'waits/Belady':>14}{'MB read/tok':>13}{'stall s':>9}  rounds")
    for r in results:
        each = ", ".join(f"{x['tokens_per_s']:.2f}" for x in runs[r["mode"]])
        print(f"{r['mode']:<26}{r['policy']:<8}{r['tokens_per_s']:>8.2f}{r['hit_rate']:>10.1%}"
              f"{r['waits'] / max(belady, 1):>14.2f}{r['mb_read_per_token']:>13.1f}{r['stall_s']:>9.2f}  [{each}]")
    by = {r["mode"]: r for r in results}
    fastest = max((r for r in results if r["prefetch"]), key=lambda r: r["tokens_per_s"])
    print(json.dumps({
        "bench": "replay", "trace": args.trace or "synthetic", "cache": args.cache, "slice_mb": slot / MB,
        "rounds": args.rounds, "threads": args.threads, "best_policy": best, "belady_misses": belady,
        **{f"{json_key(r)}_tok_s": round(r["tokens_per_s"], 3) for r in results},
        **{f"{json_key(r)}_hit_rate": round(r["hit_rate"], 4) for r in results},
        **{f"{json_key(r)}_waits": r["waits"] for r in results},
        "fastest_prefetch": fastest["mode"],
        "prefetch_vs_resident": round(fastest["tokens_per_s"] / by["resident"]["tokens_per_s"], 3),
        "prefetch_vs_no_cache": round(fastest["tokens_per_s"] / by["no cache"]["tokens_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
