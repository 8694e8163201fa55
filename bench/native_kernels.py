"""The compact tier's matrices at Qwen3-30B-A3B shapes, native kernels against torch's, cold weights.

    PYTHONPATH=src python bench/native_kernels.py [--rounds 3]     (EXPERTPAGER_NATIVE=avx2: the AVX2 kernels)

One token (a [1, K] bfloat16 row) through: an expert's gate_up (int4, 1,536 x 2,048), a Q6_K expert down projection
held as int8 rows (2,048 x 768), and the lm_head as int8 rows (151,936 x 2,048). 64 distinct random matrices per
expert shape (128 MB in all, past the caches) and one lm_head, so every call reads its weights from memory, as a
decode step does. Prints microseconds a call, best of each round, and the bandwidth those bytes imply."""

import argparse
import json
import time

import torch

from expertpager.runtime import native
from expertpager.runtime.compact import GROUP, INT4_MM, INT8_MM, int8_matmul


def per_call(f, calls: list[tuple]) -> float:
    start = time.perf_counter()
    for args in calls:
        f(*args)
    return (time.perf_counter() - start) / len(calls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if native.kernels() is None:
        raise SystemExit(f"native kernels unavailable here: {native.describe()}")
    g = torch.Generator().manual_seed(0)
    x2048, x768 = torch.randn(1, 2048, generator=g).bfloat16(), torch.randn(1, 768, generator=g).bfloat16()
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    gate_up = [(x2048, pack(torch.randint(0, 16, (1536, 2048), dtype=torch.int32, generator=g), 1),
                (torch.rand(2048 // GROUP, 1536, 2, generator=g) / 100).bfloat16()) for _ in range(64)]
    down = [(x768, torch.randint(-127, 128, (2048, 768), dtype=torch.int8, generator=g),
             (torch.rand(2048, generator=g) / 100).bfloat16()) for _ in range(64)]
    head = [(x2048, torch.randint(-127, 128, (151936, 2048), dtype=torch.int8, generator=g),
             (torch.rand(151936, generator=g) / 100).bfloat16())] * 3
    cases = {
        "gate_up int4 1536x2048": (gate_up, lambda x, w, s: INT4_MM(x, w, GROUP, s), native.q4_matmul),
        "down int8 2048x768": (down, INT8_MM, native.q8_matmul),
        "lm_head int8 151936x2048": (head, lambda x, w, s: int8_matmul(x, w.T, s), native.q8_matmul),
    }
    rows = []
    for name, (calls, torch_kernel, native_kernel) in cases.items():
        nbytes = sum(t.nbytes for t in calls[0][1:])
        for _ in range(args.rounds):  # alternating, so both see the same machine
            for kernel, f in (("torch", torch_kernel), ("native", native_kernel)):
                us = per_call(f, calls)
                rows.append({"matrix": name, "kernel": kernel, "us": round(us, 1),
                             "gb_per_s": round(nbytes / us / 1e3, 1)})
                print(f"{name:26} {kernel:7} {us:10.1f} us  {nbytes / us / 1e3:5.1f} GB/s", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "isa": native.isa(), "rows": rows}))


if __name__ == "__main__":
    main()
