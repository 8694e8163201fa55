"""Decode speed of a gpt-oss GGUF with every slice cached: what the per-use cost of rebuilding transformers'
interleaved, transposed gate_up from llama.cpp's separate gate and up comes to.

    python bench/gpt_oss_gguf.py [--type q8_0] [--dtype bfloat16] [--hidden 1024] [--layers 4] [--experts 8]
                                 [--tokens 32] [--repeats 3]

Generates a gpt_oss checkpoint with random weights in a temporary folder, exports it to GGUF (`--type`), loads it
with the dequantized expert cache holding every slice, warms the cache with one run, then decodes `--tokens`
tokens `--repeats` times (prompt 24 tokens). Prints a table, then one JSON line. Run it on two versions of the code
to compare them (the tokens are printed so the two can be checked for equality)."""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertpager.runner import run_once
from expertpager.runtime.load import load, no_transformers_bars
from expertpager.tools.export_gguf import export_gguf


def write_gpt_oss(folder: Path, hidden: int, layers: int, experts: int) -> Path:
    config = AutoConfig.for_model("gpt_oss", vocab_size=1024, hidden_size=hidden, intermediate_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4,
                                  head_dim=64, num_local_experts=experts, num_experts_per_tok=4, sliding_window=128,
                                  layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                  max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    with no_transformers_bars():
        model.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        folder = write_gpt_oss(Path(tmp) / "gpt_oss", args.hidden, args.layers, args.experts)
        path = export_gguf(folder, Path(tmp) / f"gpt_oss-{args.type}.gguf", args.type, progress=False)
        model = load(path, expert_cache="dequantized", dtype=args.dtype)
        prompt = list(range(3, 3 + 24))
        run_once(model, prompt, 4, 0.0, 0)  # pages every slice in
        runs = [run_once(model, prompt, args.tokens, 0.0, 0) for _ in range(args.repeats)]
        rates = [r.stats["decode_tokens_per_s"] for r in runs]
        print(f"{'run':>4} {'decode tok/s':>12} {'prefill tok/s':>13} {'hit rate':>8}")
        for i, r in enumerate(runs):
            print(f"{i:>4} {r.stats['decode_tokens_per_s']:>12.2f} {r.stats['prefill_tokens_per_s']:>13.1f} "
                  f"{r.stats['hit_rate']:>8.1%}")
        print(json.dumps({"bench": "gpt_oss_gguf", "type": args.type, "dtype": args.dtype, "hidden": args.hidden,
                          "layers": args.layers, "experts": args.experts, "slice_bytes": model.layout.slice_bytes,
                          "decode_tokens_per_s_median": round(statistics.median(rates), 2),
                          "decode_tokens_per_s": [round(x, 2) for x in rates],
                          "tokens": runs[0].generation.tokens[:8]}))
        model.pager.close()


if __name__ == "__main__":
    sys.exit(main())
