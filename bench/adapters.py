"""Many LoRA adapters paged through the demo model's one expert cache: switch cost cold and warm, hit rates, and
what adapter traffic does to the expert hit rate. One run.

    PYTHONPATH=src python bench/adapters.py [--adapters 50] [--requests 200] [--cache-experts 50] [--hold 4]

Generates --adapters random LoRA adapters of the demo model with peft (rank 4 on q_proj/v_proj and on every
expert's gate_up/down, as the trained ones in demo_model/adapters are; their pieces are 4 KiB slots beside 24 KiB
slices), adds the trained code and prose adapters when present, and loads them all into one paged model whose cache
holds --cache-experts percent of the expert slots plus --hold adapters' pieces. Reads are O_DIRECT from files whose
pages are dropped first, so a miss is a disk read.

Switch cost: prefill of one held-out prompt (64 tokens) right after switching to an adapter never used (cold: its
pieces come from disk), again at once (warm), and with no adapter, as medians over --switches adapters.
Workload: --requests requests, each a 32-token held-out prompt and 4 greedy tokens, the adapter drawn from a Zipf
law (s = 1.1) over all adapters; the same requests with one adapter only and with none show the effect on the
expert hit rate. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.pager import drop_page_cache
from expertpager.pager.replay import slot_needs
from expertpager.runtime.generate import generate
from expertpager.runtime.load import load, no_transformers_bars

ROOT = Path(__file__).resolve().parent.parent
TRAINED = demo_model_path() / "adapters"


def make_adapters(n: int, out: Path) -> dict[str, Path]:
    """`n` random rank-4 adapters of the demo model (attention and experts), saved by peft in bfloat16."""
    with no_transformers_bars():
        base = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(base, config)
    out_paths = {}
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        out_paths[f"gen{i:02d}"] = out / f"gen{i:02d}"
        model.to(torch.bfloat16).save_pretrained(out_paths[f"gen{i:02d}"])
        model.to(torch.float32)
    return out_paths


def drop_pages(model_folder: Path, store: Path) -> None:
    for f in [*model_folder.glob("*.safetensors"), *store.glob("*.bin")]:
        drop_page_cache(f)


@torch.inference_mode()
def prefill_seconds(model, ids: list[int]) -> float:
    t0 = time.perf_counter()
    model(input_ids=torch.tensor([ids]))
    return time.perf_counter() - t0


def delta(after, before) -> dict:
    """Expert and adapter-piece hit rates and bytes read between two stats snapshots."""
    def rate(a, b):
        pins = a.pins - b.pins
        return (a.hits - b.hits) / pins if pins else 0.0
    return {"expert_hit_rate": rate(after, before), "adapter_hit_rate": rate(after.adapters, before.adapters),
            "expert_bytes_read": after.bytes_read - before.bytes_read,
            "adapter_bytes_read": after.adapters.bytes_read - before.adapters.bytes_read}


def workload(model, choices: list[str | None], prompts: list[list[int]]) -> dict:
    before = model.pager.stats_snapshot()
    t0 = time.perf_counter()
    for name, ids in zip(choices, prompts):
        with model.adapters.use(name):
            generate(model, ids, 4)
    return {**delta(model.pager.stats_snapshot(), before), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--switches", type=int, default=8)
    ap.add_argument("--cache-experts", type=float, default=50, help="percent of the expert slots the cache holds")
    ap.add_argument("--hold", type=int, default=4, help="adapters whose pieces the cache holds besides")
    ap.add_argument("--policy", default="lru")
    args = ap.parse_args()
    torch.manual_seed(0)
    folder = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (ROOT / "tests/data/heldout_code.txt").read_text() + (ROOT / "tests/data/heldout_prose.txt").read_text()
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        store = Path(tmp) / "store"
        os.environ["EXPERTPAGER_CACHE"] = str(store)
        paths = make_adapters(args.adapters, Path(tmp) / "adapters")
        paths.update({d: TRAINED / d for d in ("code", "prose") if (TRAINED / d).is_dir()})
        probe = load(folder, adapters=paths)  # every slice and piece fits: the slot sizes of each
        pieces = slot_needs(probe.adapters.pieces)
        per_adapter = sum(n for k, n in pieces.items() if k[2] == "gen00")
        slices = sum(slot_needs(probe.layout.slices).values())
        probe.pager.close()
        cache = int(slices * args.cache_experts / 100) + args.hold * per_adapter
        drop_pages(folder, store / "adapters")
        model = load(folder, cache=cache, policy=args.policy, io="direct", adapters=paths)
        names = list(paths)
        start = int(rng.integers(0, len(stream) - 64))
        prompt = stream[start:start + 64]
        prefill_seconds(model, prompt)  # warm the experts this prompt routes to
        switch = {"cold": [], "warm": [], "none": []}
        for name in names[:args.switches]:
            with model.adapters.use(name):
                switch["cold"].append(prefill_seconds(model, prompt))
                switch["warm"].append(prefill_seconds(model, prompt))
            switch["none"].append(prefill_seconds(model, prompt))
        median = {k: statistics.median(v) for k, v in switch.items()}
        ranks = np.arange(1, len(names) + 1)
        zipf = ranks ** -1.1 / (ranks ** -1.1).sum()
        choices = [names[i] for i in rng.choice(len(names), size=args.requests, p=zipf)]
        prompts = [stream[s:s + 32] for s in rng.integers(0, len(stream) - 32, size=args.requests).tolist()]
        rows = {"zipf over adapters": workload(model, choices, prompts),
                "one adapter": workload(model, [names[0]] * args.requests, prompts),
                "no adapter": workload(model, [None] * args.requests, prompts)}
        model.pager.close()
    print(f"{len(names)} adapters, cache {cache / 2**20:.1f} MiB = {args.cache_experts:.0f}% of expert slots "
          f"({slices / 2**20:.1f} MiB) + {args.hold} adapters' pieces ({per_adapter / 2**20:.2f} MiB each); policy {args.policy}")
    print(f"switch (prefill of 64 tokens, median of {args.switches}): cold {median['cold'] * 1e3:.1f} ms, "
          f"warm {median['warm'] * 1e3:.1f} ms, no adapter {median['none'] * 1e3:.1f} ms; "
          f"cold/warm {median['cold'] / median['warm']:.2f}x, warm/no adapter {median['warm'] / median['none']:.2f}x")
    print(f"{'workload':<20} {'expert hit':>10} {'adapter hit':>11} {'expert MiB':>10} {'adapter MiB':>11} {'s':>6}")
    for name, r in rows.items():
        print(f"{name:<20} {r['expert_hit_rate']:>10.1%} {r['adapter_hit_rate']:>11.1%} "
              f"{r['expert_bytes_read'] / 2**20:>10.1f} {r['adapter_bytes_read'] / 2**20:>11.1f} {r['seconds']:>6.1f}")
    print(json.dumps({"adapters": len(names), "cache_bytes": cache, "switch_seconds": median, "workloads": rows}))


if __name__ == "__main__":
    main()
