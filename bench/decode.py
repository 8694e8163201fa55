"""Decode speed, fully resident vs paged at caches of 100/50/25/10% of expert bytes, cold reads, one run.

    python bench/decode.py [--model PATH] [--tokens 32] [--fractions 100,50,25,10] [--configs lru,cycle,cycle+next-layer]

At each cache size: LRU, the layer-cycle policy, and the cycle policy with next-layer prefetch; plus once a
"no cache" row (a cache of exactly one layer's top-k slices: every slice is read on demand).

Without --model it generates a qwen3_moe checkpoint with random bf16 weights (1.2 GB of experts, 3 MiB slices) in
a temporary folder. Every paged configuration starts cold: the checkpoint's pages are dropped from the page
cache (posix_fadvise DONTNEED) and the pager reads with O_DIRECT. Prints a table, then one JSON line.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from expertpager.model.read_layout import read_layout
from expertpager.runner import load_resident, run_once
from expertpager.pager import drop_page_cache
from expertpager.runtime.load import load, min_cache_bytes
from expertpager.tools.synthetic import write_synthetic_moe


def drop_checkpoint_pages(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        drop_page_cache(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fractions", default="100,50,25,10")
    ap.add_argument("--configs", default="lru,cycle,cycle+next-layer",
                    help="policy[+predictor] per paged row, comma-separated")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        folder = Path(args.model) if args.model else write_synthetic_moe(Path(tmp) / "moe")
        layout = read_layout(folder)
        prompt = list(range(3, 3 + 24))
        rows = []
        drop_checkpoint_pages(folder)
        resident = run_once(load_resident(layout.path), prompt, args.tokens, 0.0, 0)
        rows.append({"config": "resident", **resident.stats})
        minimum = min_cache_bytes(layout)
        settings = [("no cache", minimum, "lru", None)]
        for pct in [int(x) for x in args.fractions.split(",")]:
            for config in args.configs.split(","):
                policy, _, predictor = config.partition("+")
                settings.append((f"{pct}% {config}", f"{pct}%", policy, predictor or None))
        for name, cache, policy, predictor in settings:
            drop_checkpoint_pages(folder)
            model = load(folder, cache=cache, policy=policy, io="direct", predictors=predictor)
            result = run_once(model, prompt, args.tokens, 0.0, 0)
            assert result.generation.tokens == resident.generation.tokens, f"paged output differs: {name}"
            rows.append({"config": name, **result.stats})
            model.pager.close()
            del model
        base = rows[0]["decode_tokens_per_s"]
        print(f"{'config':<24} {'decode tok/s':>12} {'ratio':>6} {'hit rate':>8} {'read GB':>8} {'stall s':>8}")
        for r in rows:
            r["ratio_to_resident"] = r["decode_tokens_per_s"] / base
            print(f"{r['config']:<24} {r['decode_tokens_per_s']:>12.2f} {r['ratio_to_resident']:>6.2f} {r['hit_rate']:>8.1%} "
                  f"{r['bytes_read'] / 1e9:>8.2f} {r['stall_seconds']:>8.2f}")
        print(json.dumps({"bench": "decode", "model": str(folder) if args.model else "synthetic", "tokens": args.tokens,
                          "expert_bytes": layout.expert_bytes, "slice_bytes": layout.slice_bytes,
                          "resident_decode_tokens_per_s": base,
                          "ratios": {r["config"]: round(r["ratio_to_resident"], 3) for r in rows[1:]},
                          "hit_rates": {r["config"]: round(r["hit_rate"], 3) for r in rows[1:]}}))


if __name__ == "__main__":
    sys.exit(main())
