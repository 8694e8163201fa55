"""Reads per miss and cold page-in throughput of a GGUF before and after `expertpager repack`.

A GGUF with Qwen3-30B-A3B slice geometry (gate/up Q4_K, down Q6_K, 3.06 MB per slice; random bytes) is streamed
through the pager with O_DIRECT in random order, then the same after repacking (one file). Run by hand:
`PYTHONPATH=src python bench/repack.py [--slices 160]`. Prints a table, then one JSON line last.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
from pathlib import Path

import gguf
import numpy as np

from expertpager.model.read_layout import read_layout
from expertpager.pager import plan_reads
from expertpager.tools.repack import repack

H, I, EXPERTS = 2048, 768, 32
_spec = importlib.util.spec_from_file_location("bench_io", Path(__file__).with_name("io.py"))
bench_io = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_io)


def write_gguf(path: Path, layers: int) -> None:
    """Stacked expert tensors of random bytes in Q4_K/Q6_K, written tensor by tensor."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(layers)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(8)
    tensors = [("token_embd.weight", "F32", (64, H))]
    for layer in range(layers):
        tensors += [(f"blk.{layer}.ffn_gate_inp.weight", "F32", (EXPERTS, H)),
                    (f"blk.{layer}.ffn_gate_exps.weight", "Q4_K", (EXPERTS, I, H)),
                    (f"blk.{layer}.ffn_up_exps.weight", "Q4_K", (EXPERTS, I, H)),
                    (f"blk.{layer}.ffn_down_exps.weight", "Q6_K", (EXPERTS, H, I))]
    for name, q, shape in tensors:
        qt = gguf.GGMLQuantizationType[q]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qt)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, q, shape in tensors:
        qt = gguf.GGMLQuantizationType[q]
        n = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qt)))
        w.write_tensor_data(rng.integers(0, 256, n, dtype=np.uint8))
    w.close()


def count_preadv(fn):
    """Run fn() and count os.preadv calls made meanwhile (the pager's only read call)."""
    real, calls = os.preadv, [0]

    def counted(*args):
        calls[0] += 1
        return real(*args)

    os.preadv = counted
    try:
        result = fn()
    finally:
        os.preadv = real
    return result, calls[0]


def measure(ref: Path, data_file: str, rounds: int) -> dict:
    layout = read_layout(ref)
    plans = [plan_reads(s) for s in layout.slices.values()]
    slices = layout.slices
    n = len(slices)
    gbps, calls = [], 0
    for r in range(rounds):
        (g, _), c = count_preadv(lambda: bench_io.pager_gbps(data_file, slices, "random", bench_io.DEFAULT_THREADS,
                                                              n * layout.slice_bytes, seed=r))
        gbps.append(g)
        calls += c
    return {"runs_per_miss": statistics.mean(len(p.runs) for p in plans),
            "preadv_per_miss": calls / (rounds * n),
            "bytes_read_per_miss": statistics.mean(p.slot_bytes for p in plans),
            "slice_bytes": layout.slice_bytes, "gbps": statistics.median(gbps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/expertpager-bench-repack")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        src = root / "model.gguf"
        write_gguf(src, args.layers)
        out = repack(src, root / "repacked", "single", progress=False)
        rows = {}
        for r in range(args.rounds):  # alternate, so the shared disk's drift hits both alike
            for name, ref, data in (("gguf", src, str(src)), ("repacked", out, str(out / "experts.bin"))):
                rows.setdefault(name, []).append(measure(ref, data, 1))
        result = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rows.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'layout':>9} {'reads/miss':>10} {'preadv/miss':>11} {'bytes read/miss':>15} {'slice bytes':>11} {'GB/s':>6}")
    for name, m in result.items():
        print(f"{name:>9} {m['runs_per_miss']:>10.2f} {m['preadv_per_miss']:>11.2f} {m['bytes_read_per_miss']:>15,.0f} "
              f"{m['slice_bytes']:>11,} {m['gbps']:>6.2f}")
    ratio = result["repacked"]["gbps"] / result["gguf"]["gbps"]
    print(f"repacked / gguf cold page-in throughput: {ratio:.2f}x ({args.layers * EXPERTS} slices, random order, O_DIRECT)")
    print(json.dumps({"bench": "repack", **{f"{n}_{k}": round(v, 3) for n, m in result.items() for k, v in m.items()},
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
