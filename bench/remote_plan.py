"""`plan`'s prediction against measured runs of a remote model (the demo MoE served as a Hub repo on loopback, with
an added per-request latency), and of the same model from local disk.

For each setting: the prediction (held-out code trace replayed at the cache size; store = the hottest slices its
disk budget holds; compute = decode tokens/s measured with every slice in RAM, same prompt; disk and network
bandwidth and latency measured by plan's own probes) and a measured decode run of the first tokens of the held-out
code text. Network requests per token: plan counts one per slice fetched; the store coalesces neighbours (see
remote/store.py), so the measured count is lower. The remote run goes twice into one store: the first fills it (cold), the second is the measured steady
state that plan predicts. Run by hand:

    PYTHONPATH=src python bench/remote_plan.py [--latency-ms 20] [--cache 25%] [--disk-share 0.5] [--tokens 32]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from http_server import Server  # noqa: E402  (the tests' Range-capable, Hub-style loopback server)

from expertpager.model.demo import demo_model_path  # noqa: E402
from expertpager.model.read_layout import read_layout  # noqa: E402
from expertpager.remote import open_store  # noqa: E402
from expertpager.runner import load_tokenizer, run_once  # noqa: E402
from expertpager.runtime.load import load  # noqa: E402
from expertpager.tools.fit import Bandwidths, disk_bandwidth, memory_bandwidth, plan_fit  # noqa: E402
from expertpager.tools.trace import load_trace  # noqa: E402


def measured(ref, ids, tokens, tokenizer, **options) -> dict:
    model = load(ref, **options)
    stats = run_once(model, ids, tokens, 0.0, 0, tokenizer).stats
    model.pager.close()
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--cache", default="25%")
    ap.add_argument("--disk-share", type=float, default=0.5, help="store budget: this share of all expert bytes + resident")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args()
    demo = demo_model_path()
    tokenizer = load_tokenizer(str(demo))
    ids = tokenizer((ROOT / "tests/data/heldout_code.txt").read_text())["input_ids"][: args.prompt_len]
    trace = load_trace(ROOT / "tests/data/traces/demo_code_heldout.npz")
    full = measured(demo, ids, args.tokens, tokenizer, cache="100%")
    compute = full["decode_tokens_per_s"]
    rows = []
    with Server() as srv, tempfile.TemporaryDirectory() as tmp:
        srv.served.repos["org/demo"] = demo
        srv.served.latency = args.latency_ms / 1e3
        import os

        os.environ["HF_ENDPOINT"] = srv.url
        ref, folder = "hf://org/demo", Path(tmp) / "store"
        store = open_store(ref, folder)
        store.fetch_resident()
        disk = int(store.fixed_bytes + args.disk_share * store.layout.expert_bytes)
        net, latency = store.measure_network()
        remote_bw = Bandwidths(disk_bandwidth(folder=str(folder)), memory_bandwidth(), net, latency)
        local = read_layout(demo)
        local_bw = Bandwidths(disk_bandwidth(local), remote_bw.memory)
        for name, layout, bw, is_remote in (("local disk", local, local_bw, False), ("remote", store.layout, remote_bw, True)):
            fit = plan_fit(layout, None, disk if is_remote else None, is_remote, bw, trace=trace, compute_tps=compute,
                           fixed_disk_bytes=store.fixed_bytes, cache=args.cache)
            if is_remote:
                cold = measured(ref, ids, args.tokens, tokenizer, cache=args.cache, store=folder, disk=disk)
                run = measured(ref, ids, args.tokens, tokenizer, cache=args.cache, store=folder, disk=disk)
            else:
                cold, run = None, measured(demo, ids, args.tokens, tokenizer, cache=args.cache)
            tokens = run["prompt_tokens"] + run["new_tokens"]
            rows.append({"setting": name, "predicted_tps": fit.predicted_tokens_per_s, "measured_tps": run["decode_tokens_per_s"],
                         "ratio": run["decode_tokens_per_s"] / fit.predicted_tokens_per_s,
                         "predicted_hit_rate": fit.hit_rate, "measured_hit_rate": run["hit_rate"],
                         "predicted_net_bytes_per_token": fit.network_bytes_per_token,
                         "measured_net_bytes_per_token": run.get("remote_bytes", 0) / tokens if is_remote else 0.0,
                         "predicted_requests_per_token": fit.network_requests_per_token,
                         "measured_requests_per_token": run.get("remote_requests", 0) / tokens if is_remote else 0.0,
                         "cold_tps": cold["decode_tokens_per_s"] if cold else None,
                         "store_hit_rate": run.get("store_hit_rate")})
    print(f"compute alone (every slice in RAM): {compute:.1f} decode tokens/s; cache {args.cache}, "
          f"latency {args.latency_ms:g} ms, store {args.disk_share:.0%} of expert bytes")
    print(f"{'setting':12} {'predicted':>10} {'measured':>10} {'ratio':>6} {'hit pred':>9} {'hit meas':>9} "
          f"{'net B/tok pred':>15} {'net B/tok meas':>15} {'req/tok pred':>12} {'req/tok meas':>12} {'cold tok/s':>10}")
    for r in rows:
        print(f"{r['setting']:12} {r['predicted_tps']:10.2f} {r['measured_tps']:10.2f} {r['ratio']:6.2f} "
              f"{r['predicted_hit_rate']:9.1%} {r['measured_hit_rate']:9.1%} {r['predicted_net_bytes_per_token']:15.0f} "
              f"{r['measured_net_bytes_per_token']:15.0f} {r['predicted_requests_per_token']:12.2f} "
              f"{r['measured_requests_per_token']:12.2f} {r['cold_tps'] or 0:10.2f}")
    print(json.dumps({"compute_tps": compute, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
