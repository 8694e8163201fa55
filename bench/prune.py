"""Expert pruning on the demo model: held-out loss after REAP, frequency and random pruning at several keep rates,
a code-specialised prune measured on both domains, and the hit rate of a pruned model at the same cache bytes.

    PYTHONPATH=src python bench/prune.py [--calib-tokens 8192] [--eval-tokens 4096] [--keeps 87.5,75,50] [--random-seeds 3]

Calibration: training-split text only (scripts/train_demo.py's splits: standard-library files spread over the
sorted list, and the pydoc topics), `--calib-tokens` of each domain, scored through the paged runtime once with a
cache of a quarter of the experts (the scores do not depend on the keep rate). Evaluation: the first
`--eval-tokens` of the committed held-out texts (tests/data/heldout_*.txt; prose has 6,800 in all), in 256-token
windows with `expertpager.tools.evaluate.evaluate_loss` (what `expertpager eval` runs), each pruned checkpoint
written by `write_pruned` and loaded by plain transformers; everything computes in float32 (bf16 weights). The code-specialised prune weights
REAP by a code profile made from the code calibration text (`--per-domain`). Hit rate: held-out traces of the
pruned model replayed through the pager's own LRU and cycle policies with the cache bytes that hold 25% of the
unpruned model's experts. Prints tables, then one JSON line.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from calibrate_demo import spread  # noqa: E402
from train_demo import EOS, code_documents, prose_documents  # noqa: E402

from expertpager.model.demo import demo_model_path  # noqa: E402
from expertpager.model.read_layout import read_layout  # noqa: E402
from expertpager.runner import load_tokenizer  # noqa: E402
from expertpager.runtime.load import load  # noqa: E402
from expertpager.runtime.profiles import Profile  # noqa: E402
from expertpager.tools.evaluate import evaluate_loss  # noqa: E402
from expertpager.tools.prune import write_pruned  # noqa: E402
from expertpager.tools.prune_scores import ExpertStats, collect_stats, expert_scores, kept_experts  # noqa: E402
from expertpager.tools.simulate import simulate  # noqa: E402
from expertpager.tools.trace import record_trace  # noqa: E402

DATA = ROOT / "tests" / "data"
DOMAINS = ("code", "prose")


def calibration_ids(tokenizer, tokens: int) -> dict[str, list[int]]:
    """`tokens` training-split tokens of each domain (never the held-out text)."""
    texts = {"code": spread(code_documents()[0], 6 * tokens), "prose": EOS.join(prose_documents()[0])}
    return {d: tokenizer(t)["input_ids"][:tokens] for d, t in texts.items()}


def merged(a: ExpertStats, b: ExpertStats) -> ExpertStats:
    return ExpertStats(a.layers, a.counts + b.counts, a.reap_sums + b.reap_sums, a.tokens + b.tokens)


def held_out(model, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    losses = {d: evaluate_loss(model, ids)[0] for d, ids in heldout.items()}
    print(f"  [{time.strftime('%H:%M:%S')}] " + ", ".join(f"{d} {v:.4f}" for d, v in losses.items()), file=sys.stderr, flush=True)
    return losses


def pruned_model(layout, scores: np.ndarray, keep: int, folder: Path):
    kept = dict(zip(layout.moe_layers, kept_experts(scores, keep)))
    out = write_pruned(layout, kept, folder, {"keep": keep}, progress=False)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def hit_rates(model, heldout: dict[str, torch.Tensor], cache_fraction: float, trace_tokens: int) -> dict[str, float]:
    """LRU and cycle hit rates of `model`'s held-out traces at `cache_fraction` of its own experts."""
    traces = {d: record_trace(model, ids[:trace_tokens]) for d, ids in heldout.items()}
    rows = simulate(traces, [cache_fraction], ["lru", "cycle"])
    return {f"{r.trace} {r.policy}": r.hit_rate for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens per domain")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens evaluated per domain")
    ap.add_argument("--keeps", default="87.5,75,50", help="percentages of experts kept")
    ap.add_argument("--random-seeds", type=int, default=3, help="random prunes averaged per keep rate")
    ap.add_argument("--cache", type=float, default=0.25, help="cache for the hit rates, share of the unpruned experts")
    ap.add_argument("--trace-tokens", type=int, default=2048, help="held-out tokens replayed per domain for hit rates")
    args = ap.parse_args()

    path = demo_model_path()
    layout = read_layout(path)
    tokenizer = load_tokenizer(str(path))
    heldout = {d: torch.tensor(tokenizer((DATA / f"heldout_{d}.txt").read_text())["input_ids"][:args.eval_tokens]) for d in DOMAINS}
    calib = calibration_ids(tokenizer, args.calib_tokens)
    paged = load(path, cache="25%", dtype="float32")  # statistics through the paged runtime, a quarter of the experts in the cache
    stats = {d: collect_stats(paged, ids) for d, ids in calib.items()}
    paged.pager.close()
    both = merged(stats["code"], stats["prose"])
    code_profile = Profile("code", stats["code"].layers, stats["code"].counts, stats["code"].tokens)

    E, k = layout.num_experts, layout.experts_per_token
    base_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = held_out(base_model, heldout)
    rows = [dict(method="unpruned", keep=E, **base)]
    hits = {"unpruned": hit_rates(base_model, heldout, args.cache, args.trace_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for pct in [float(x) for x in args.keeps.split(",")]:
            keep = round(E * pct / 100)
            for method in ("reap", "frequency"):
                n += 1
                model = pruned_model(layout, expert_scores(both, method, both.layers, E), keep, Path(tmp) / str(n))
                rows.append(dict(method=method, keep=keep, **held_out(model, heldout)))
                if method == "reap" and keep == E // 2:
                    hits[f"reap keep {keep}"] = hit_rates(model, heldout, args.cache * E / keep, args.trace_tokens)
            seeds = []
            for seed in range(args.random_seeds):
                n += 1
                model = pruned_model(layout, expert_scores(None, "random", both.layers, E, seed), keep, Path(tmp) / str(n))
                seeds.append(held_out(model, heldout))
            rows.append(dict(method=f"random (mean of {args.random_seeds})", keep=keep,
                             **{d: float(np.mean([s[d] for s in seeds])) for d in DOMAINS},
                             **{f"{d}_range": [min(s[d] for s in seeds), max(s[d] for s in seeds)] for d in DOMAINS}))
            n += 1
            model = pruned_model(layout, expert_scores(both, "reap", both.layers, E, profile=code_profile), keep,
                                 Path(tmp) / str(n))
            rows.append(dict(method="reap --per-domain code", keep=keep, **held_out(model, heldout)))

    print(f"held-out loss (nats; {heldout['code'].numel():,} code and {heldout['prose'].numel():,} prose tokens), "
          f"calibration {both.tokens:,} training tokens, demo model {E} experts x top-{k}")
    print("| method | kept | code | prose | code vs unpruned | prose vs unpruned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = " | ".join(f"{100 * (r[d] / base[d] - 1):+.1f}%" for d in DOMAINS)
        print(f"| {r['method']} | {r['keep']} ({100 * r['keep'] / E:g}%) | {r['code']:.3f} | {r['prose']:.3f} | {rel} |")
    print(f"\nhit rate at the same cache bytes ({100 * args.cache:g}% of the unpruned experts), first "
          f"{args.trace_tokens} held-out tokens per domain replayed")
    for name, h in hits.items():
        print(f"  {name}: " + ", ".join(f"{key} {v:.1%}" for key, v in h.items()))
    at75 = {r["method"]: r for r in rows if r["keep"] == round(E * 0.75)}
    rnd = next((r for m, r in at75.items() if m.startswith("random")), None)
    if "reap" in at75 and rnd is not None:
        reap = at75["reap"]
        below = all(reap[d] < rnd[d] for d in DOMAINS)
        within = {d: reap[d] / base[d] - 1 for d in DOMAINS}
        print(f"\nbar at keep 75%: REAP below random on both domains: {below}; REAP vs unpruned: "
              + ", ".join(f"{d} {100 * v:+.2f}%" for d, v in within.items()) + " (bar: within 5%)")
    print(json.dumps({"bench": "prune", "calibration_tokens": both.tokens, "rows": rows, "hit_rates": hits}))


if __name__ == "__main__":
    main()
