"""What a cache of raw quantized slices costs per use against what it saves: per Qwen3-30B-A3B expert slice
(gate/up Q4_K, down Q6_K, 3 x 768 x 2048), the torch dequantization time, the single-token compute time, and
the cold O_DIRECT read time, and how many more slices a budget holds raw than dequantized to bf16.
Run by hand: `PYTHONPATH=src python bench/dequant.py`. Prints a table, then one JSON line last.
"""

import json
import mmap
import os
import statistics
import time

import numpy as np
import torch

from expertpager.runtime.dequant import BLOCKS, dequantize

H, I = 2048, 768
PARTS = (("gate", "Q4_K", (I, H)), ("up", "Q4_K", (I, H)), ("down", "Q6_K", (H, I)))
SCALE_AT = {"Q4_K": (0, 2), "Q6_K": (208,)}  # float16 scale fields, set finite


def random_part(qtype: str, shape: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    block, size = BLOCKS[qtype]
    raw = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        raw[:, at:at + 2] = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(-1))


def median_ms(fn, repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def read_ms(nbytes: int, path: str = "/tmp/expertpager-bench-dequant.bin", slices: int = 64) -> float:
    """Median cold O_DIRECT read of one slice-sized aligned range (pages dropped first)."""
    size = -(-nbytes // 4096) * 4096
    with open(path, "wb") as f:
        f.write(os.urandom(size * slices))
    buf = mmap.mmap(-1, size)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        times = []
        for i in range(slices):
            t0 = time.perf_counter()
            os.preadv(fd, [memoryview(buf)], i * size)
            times.append(time.perf_counter() - t0)
        os.close(fd)
    finally:
        buf.close()
        os.unlink(path)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = np.random.default_rng(0)
    parts = [(role, q, shape, random_part(q, shape, rng)) for role, q, shape in PARTS]
    raw_bytes = sum(p[3].numel() for p in parts)
    bf16_bytes = sum(2 * s[0] * s[1] for _, _, s, _ in parts)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        rows[f"dequantize to {str(dtype)[6:]}"] = median_ms(lambda: [dequantize(r, q, s).to(dtype) for _, q, s, r in parts])
    w = {role: dequantize(r, q, s).to(torch.bfloat16) for role, q, s, r in parts}
    x = torch.randn(1, H, dtype=torch.bfloat16)

    def token():
        h = torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)
        return h @ w["down"].T

    rows["1-token expert compute (bf16)"] = median_ms(token)
    rows["cold O_DIRECT read of the raw slice"] = read_ms(raw_bytes)
    print(f"slice: {raw_bytes / 1e6:.2f} MB raw (Q4_K/Q4_K/Q6_K), {bf16_bytes / 1e6:.2f} MB as bf16: "
          f"a budget holds {bf16_bytes / raw_bytes:.2f}x more slices raw")
    for name, ms in rows.items():
        print(f"{name:>40}: {ms:8.3f} ms")
    print(json.dumps({"bench": "dequant", "raw_mb": round(raw_bytes / 1e6, 3), "bf16_mb": round(bf16_bytes / 1e6, 3),
                      "capacity_ratio": round(bf16_bytes / raw_bytes, 3),
                      **{k.replace(" ", "_"): round(v, 3) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
