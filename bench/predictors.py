"""Predictor quality and what prediction buys, on the demo model's held-out code and prose. Run by hand:

    PYTHONPATH=src python bench/predictors.py [--model DIR] [--code FILE] [--prose FILE] [--tokens 2048]

1. Quality: the model runs over each text (windows of 256, the runtime's dtype) with hooks; next-layer
   speculation (the runtime's `speculate`: layer l+d's norm and router on layer l's residual stream, "plain", or
   the model's fitted speculator map for (l+d, d), "fitted", when the model folder has speculator.safetensors)
   is scored against the experts layer l+d then picks, for d = 1, 2, 3, top-k and top-(k+extra); temporal reuse
   is the share of a token's experts the previous token used in the same layer. Recall = share of the needed
   slices that were predicted; precision = share of predicted slices that were needed.
2. Live decode: a paged model (cache 25%, io=direct) prefills a 64-token prompt from the second half of each
   text and greedily decodes 32 tokens, with each predictor setting ("next-layer" uses the fitted speculator
   when there is one, "next-layer (plain)" the routers); the decode's hit rate counts pins served from memory
   (joins wait on a load in flight). Domain profiles are built from the first half of each text.
Prints tables, then one JSON line.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from expertpager.model.demo import demo_model_path
from expertpager.runner import load_tokenizer
from expertpager.runtime.generate import generate
from expertpager.runtime.load import load
from expertpager.runtime.moe_layers import moe_layers
from expertpager.runtime.profiles import save_profile
from expertpager.runtime.speculator import find_speculator
from expertpager.tools.profile import build_profile
from expertpager.tools.routing_stats import next_token_reuse
from expertpager.tools.speculation import recall_precision, speculation
from expertpager.tools.trace import Trace

SETTINGS = [("none", "none", False), ("temporal", "temporal", False), ("next-layer (plain)", "next-layer", False),
            ("next-layer", "next-layer", None), ("next-layer+4 (plain)", "next-layer+4", False),
            ("next-layer+4", "next-layer+4", None), ("domain", "domain", False),
            ("next-layer,temporal,domain", "next-layer,temporal,domain", None)]  # (label, predictors, speculator)


def quality(model, ids: list[int], extra: int, speculator=None) -> dict:
    """Per-layer recall/precision by look-ahead distance, top-k and top-(k+extra), and temporal reuse."""
    actual, predicted = speculation(model, np.array(ids), lookahead=3, extra=extra, speculator=speculator)
    k = actual.shape[-1]
    recall, precision = recall_precision(actual, predicted[..., :k])
    wide_recall, wide_precision = recall_precision(actual, predicted)
    reuse = next_token_reuse(Trace(actual, np.zeros(actual.shape, np.float32), np.arange(actual.shape[1]),
                                   np.array(ids), model.config.num_experts))
    return {"recall": recall, "precision": precision, "wide_recall": wide_recall,
            "wide_precision": wide_precision, "temporal": reuse}


def summary(q: dict) -> dict:
    """Means over target layers, per distance."""
    mean = lambda a: [round(float(np.nanmean(a[:, d])), 4) for d in range(a.shape[1])]
    return {"next_layer_recall": mean(q["recall"]), "next_layer_precision": mean(q["precision"]),
            "wide_recall": mean(q["wide_recall"]), "wide_precision": mean(q["wide_precision"]),
            "d1_recall_by_layer": [None if np.isnan(x) else round(float(x), 4) for x in q["recall"][:, 0]],
            "d1_wide_recall_by_layer": [None if np.isnan(x) else round(float(x), 4) for x in q["wide_recall"][:, 0]],
            "temporal": round(float(q["temporal"].mean()), 4)}


def print_quality(name: str, q: dict, k: int, extra: int) -> None:
    print(f"\n{name}: next-layer speculation and temporal reuse (k={k}, wide = top-{k + extra}, d=1)")
    print(f"{'layer':>5} | {'d=1 rec':>8} {'d=1 prec':>8} | {'d=2 rec':>8} | {'d=3 rec':>8} | "
          f"{'wide rec':>8} {'wide prec':>9} | {'temporal':>8}")
    fmt = lambda x: "     -  " if np.isnan(x) else f"{x:8.3f}"
    for m in range(len(q["temporal"])):
        print(f"{m:>5} | {fmt(q['recall'][m, 0])} {fmt(q['precision'][m, 0])} | {fmt(q['recall'][m, 1])} | "
              f"{fmt(q['recall'][m, 2])} | {fmt(q['wide_recall'][m, 0])} {fmt(q['wide_precision'][m, 0])}  | {q['temporal'][m]:8.3f}")
    means = [np.nanmean(q["recall"][:, d]) for d in range(3)]
    print(f"{'mean':>5} | {means[0]:8.3f} {np.nanmean(q['precision'][:, 0]):8.3f} | {means[1]:8.3f} | {means[2]:8.3f} | "
          f"{np.nanmean(q['wide_recall'][:, 0]):8.3f} {np.nanmean(q['wide_precision'][:, 0]):8.3f}  | {q['temporal'].mean():8.3f}")


def decode_hits(ref: str, prompt: list[int], setting: str, speculator, profiles: str, cache: str, policy: str) -> dict:
    """Greedy-decode 32 tokens after `prompt` on a fresh paged model; counts during the decode only."""
    model = load(ref, cache=cache, policy=policy, io="direct", predictors=setting, profiles=profiles, speculator=speculator)
    after_prefill = []
    generate(model, prompt, 33, on_token=lambda _t: after_prefill.append(model.pager.stats_snapshot()) if not after_prefill else None)
    end, start = model.pager.stats_snapshot(), after_prefill[0]
    chosen = next((p.chosen for p in (model.prefetcher.predictors if model.prefetcher else []) if p.name == "domain"), None)
    model.pager.close()
    pins = lambda s: s.hits + s.joins + s.misses
    return {"hits": end.hits - start.hits, "joins": end.joins - start.joins, "misses": end.misses - start.misses,
            "pins": pins(end) - pins(start), "prefetch_issued": end.prefetch_issued - start.prefetch_issued,
            "chosen": chosen[0] if chosen else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--model", default=str(demo_model_path()))
    ap.add_argument("--code", default=str(root / "tests/data/heldout_code.txt"))
    ap.add_argument("--prose", default=str(root / "tests/data/heldout_prose.txt"))
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of each text scored for quality")
    ap.add_argument("--extra", type=int, default=4, help="extra experts in the wide prediction")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per domain in the live decode")
    ap.add_argument("--cache", default="25%")
    ap.add_argument("--policy", default="lru")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.model)
    texts = {"code": Path(args.code).read_text(), "prose": Path(args.prose).read_text()}
    ids = {name: tok(text)["input_ids"] for name, text in texts.items()}
    resident = load(args.model)
    k = resident.config.num_experts_per_tok
    fitted = find_speculator(args.model, None, [l.index for l in moe_layers(resident)], resident.config.hidden_size,
                             resident.config.num_experts)
    out = {"bench": "predictors", "model": args.model, "k": k, "extra": args.extra,
           "speculator": str(fitted.path) if fitted else None}
    for name, seq in ids.items():
        out[name] = {}
        for kind, spec in (("plain", None), ("fitted", fitted)) if fitted else (("plain", None),):
            q = quality(resident, seq[:args.tokens], args.extra, spec)
            print_quality(f"{name}, {kind}", q, k, args.extra)
            out[name][kind] = summary(q)
    with tempfile.TemporaryDirectory() as profiles:
        for name, seq in ids.items():
            save_profile(build_profile(resident, seq[:len(seq) // 2][:4096], name, args.model), Path(profiles) / f"{name}.json")
        resident.pager.close()
        settings = [s for s in SETTINGS if fitted or s[2] is False]
        live: dict[str, dict] = {s[0]: {"hits": 0, "joins": 0, "misses": 0, "pins": 0, "prefetch_issued": 0, "right_domain": 0}
                                 for s in settings}
        for name, seq in ids.items():
            half = seq[len(seq) // 2:]
            for i in range(args.prompts):
                prompt = half[i * len(half) // args.prompts:][:64]
                for label, setting, speculator in settings:
                    r = decode_hits(args.model, prompt, setting, speculator, profiles, args.cache, args.policy)
                    for key in ("hits", "joins", "misses", "pins", "prefetch_issued"):
                        live[label][key] += r[key]
                    live[label]["right_domain"] += r["chosen"] == name
    n = 2 * args.prompts
    print(f"\nlive decode, first 32 tokens after a 64-token prompt, cache {args.cache}, {args.policy}, {n} prompts")
    print(f"{'predictors':<28}{'hit rate':>9}{'joins':>7}{'misses':>8}{'prefetches':>11}{'domain right':>13}")
    for setting, c in live.items():
        c["hit_rate"] = c["hits"] / c["pins"]
        print(f"{setting:<28}{c['hit_rate']:>9.1%}{c['joins']:>7}{c['misses']:>8}{c['prefetch_issued']:>11}"
              f"{str(c['right_domain']) + '/' + str(n) if 'domain' in setting else '-':>13}")
    out["live"] = {s: {"hit_rate": round(c["hit_rate"], 4), "misses": c["misses"], "joins": c["joins"],
                       "right_domain": c["right_domain"]} for s, c in live.items()}
    out["live_settings"] = {"cache": args.cache, "policy": args.policy, "prompts": n, "decode_tokens": 32}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
