"""Decode speed of a quantized GGUF, raw-block cache vs dequantized cache at the same byte budgets, cold reads, one run.

    python bench/gguf_decode.py [--type q4_0] [--tokens 16] [--fractions 50,25] [--dtype auto]

Generates a qwen3_moe checkpoint with random bf16 weights in a temporary folder and exports it to GGUF (`--type`).
Each budget is a percentage of the GGUF's expert bytes; both tiers get the same bytes (the dequantized tier holds
fewer, larger slices and its staging buffers come out of the same budget). Every configuration starts cold: the
file's pages are dropped from the page cache and the pager reads with O_DIRECT. Prints a table, then one JSON line.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from expertpager.model.read_layout import read_layout
from expertpager.runner import run_once
from expertpager.runtime.load import EXPERT_CACHES, compute_dtype, load
from expertpager.tools.export_gguf import export_gguf
from expertpager.pager import drop_page_cache
from expertpager.tools.synthetic import write_synthetic_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--fractions", default="50,25")
    ap.add_argument("--dtype", default="auto", help="compute dtype: auto (float32 for a quantized GGUF) or bfloat16")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        folder = write_synthetic_moe(Path(tmp) / "moe", layers=args.layers, experts=args.experts)
        path = export_gguf(folder, Path(tmp) / f"moe-{args.type}.gguf", args.type, progress=False)
        layout = read_layout(path)
        prompt = list(range(3, 3 + 24))
        rows, tokens = [], {}
        for pct in [int(x) for x in args.fractions.split(",")]:
            for tier in reversed(EXPERT_CACHES):
                drop_page_cache(path)
                model = load(path, cache=f"{pct}%", expert_cache=tier, io="direct", dtype=args.dtype)
                result = run_once(model, prompt, args.tokens, 0.0, 0)
                tokens.setdefault(pct, result.generation.tokens)
                assert result.generation.tokens == tokens[pct], f"{tier} output differs at {pct}%"
                rows.append({"config": f"{tier} {pct}%", "slots": model.pager.num_slots, **result.stats})
                model.pager.close()
                del model
        print(f"{'config':<18} {'decode tok/s':>12} {'slots':>6} {'hit rate':>8} {'read GB':>8} {'stall s':>8}")
        for r in rows:
            print(f"{r['config']:<18} {r['decode_tokens_per_s']:>12.3f} {r['slots']:>6} {r['hit_rate']:>8.1%} "
                  f"{r['bytes_read'] / 1e9:>8.3f} {r['stall_seconds']:>8.2f}")
        tps = {r["config"]: r["decode_tokens_per_s"] for r in rows}
        pcts = sorted({int(c.split()[1][:-1]) for c in tps}, reverse=True)
        print(json.dumps({"bench": "gguf_decode", "type": args.type, "dtype": str(compute_dtype(layout, args.dtype)),
                          "tokens": args.tokens, "expert_bytes": layout.expert_bytes, "slice_bytes": layout.slice_bytes,
                          "decode_tokens_per_s": {c: round(v, 3) for c, v in tps.items()},
                          "dequantized_over_raw": {f"{p}%": round(tps[f"dequantized {p}%"] / tps[f"raw {p}%"], 2) for p in pcts},
                          "hit_rates": {r["config"]: round(r["hit_rate"], 3) for r in rows}}))


if __name__ == "__main__":
    sys.exit(main())
