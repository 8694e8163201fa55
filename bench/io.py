"""Cold page-in throughput of the pager next to a raw sequential O_DIRECT read of the same file, and the cost
of a hit. Run by hand: `PYTHONPATH=src python bench/io.py [--path FILE] [--gib 2]`. Prints a table, then one
JSON line last. Writes a scratch file (deleted at the end); needs Linux with O_DIRECT for honest cold reads.
"""

import argparse
import json
import mmap
import os
import random
import statistics
import time

import numpy as np

from expertpager.model.layout import ExpertSlice, TensorPart
from expertpager.pager import SliceCache, drop_page_cache

MIB = 2**20
SIZES = [256 * 1024, MIB, 2 * MIB, 4 * MIB, 16 * MIB, 64 * MIB]
THREADS = [1, 4, 8]
DEFAULT_THREADS = 4


def write_file(path: str, nbytes: int) -> None:
    """Random-ish bytes: one random block, varied per 4 MiB chunk so no two chunks are equal."""
    block = np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8)
    with open(path, "wb") as f:
        for i in range(0, nbytes, 64 * MIB):
            chunk = block[: min(64 * MIB, nbytes - i)].copy()
            chunk[:: 4 * MIB] = i // MIB % 256
            f.write(chunk.data)
        f.flush()
        os.fsync(f.fileno())


def gguf_like_slices(path: str, file_bytes: int, slice_bytes: int) -> dict:
    """Layers of up to 16 experts; each role one stacked tensor at an unaligned offset, an expert's part contiguous."""
    part = slice_bytes // 3
    experts = max(1, min(16, file_bytes // (8 * slice_bytes)))
    layer_bytes = 3 * (experts * part + 4099)
    slices, pos, layer = {}, 1237, 0
    while pos + layer_bytes <= file_bytes:
        bases = []
        for _ in range(3):
            bases.append(pos)
            pos += experts * part + 4099  # unaligned padding between tensors
        for e in range(experts):
            parts = tuple(TensorPart(r, path, b + e * part, part, "Q4_K", (part,)) for r, b in zip(("gate", "up", "down"), bases))
            slices[(layer, e)] = ExpertSlice(layer, e, parts)
        layer += 1
    return slices


def raw_direct_gbps(path: str, nbytes: int, start: int = 0) -> float:
    """dd iflag=direct bs=4M: one thread, sequential 4 MiB O_DIRECT reads from `start`."""
    drop_page_cache(path)
    buf = mmap.mmap(-1, 4 * MIB)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    t0, done = time.perf_counter(), 0
    while done < nbytes:
        n = os.preadv(fd, [mv], start + done)
        if n <= 0:
            break
        done += n
    seconds = time.perf_counter() - t0
    os.close(fd)
    mv.release()
    buf.close()
    return done / seconds / 1e9


def pager_gbps(path: str, slices: dict, order: str, threads: int, read_bytes: int, seed: int = 1) -> tuple[float, float]:
    """Stream distinct slices through a cache: pin each in turn while prefetches run ahead. Returns (GB/s, waste)."""
    keys = list(slices)
    if order == "random":
        random.Random(seed).shuffle(keys)
    size = next(iter(slices.values())).nbytes
    keys = keys[: max(16, read_bytes // size)]
    ahead = threads + 2
    slots = 2 * ahead + 2  # enough that LRU never evicts a prefetched slice before its pin
    need = size + 4 * 4096 * 3
    drop_page_cache(path)
    with SliceCache(slices, budget=slots * need, policy="lru", io="direct", threads=threads) as cache:
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            cache.prefetch(keys[i + 1 : i + 1 + ahead])
            with cache.pin(key):
                pass
        seconds = time.perf_counter() - t0
        s = cache.stats
    return len(keys) * size / seconds / 1e9, s.prefetch_wasted / len(keys)


def _region(r: int, nbytes: int, length: int) -> int:
    """A different 4 MiB-aligned start for each raw read, so no raw read finds a region warm in the host's cache
    that the others don't (the start of the file reads faster here when read over and over)."""
    return random.Random(r).randrange(0, nbytes - length) // (4 * MIB) * (4 * MIB)


def paired_ratio(path: str, nbytes: int, rounds: int = 5) -> tuple[float, float, float]:
    """The headline case (4 MiB slices, random order, default threads), each round right after a raw read of
    as many bytes, so the shared disk's drift hits both alike. Returns medians (pager GB/s, raw GB/s, ratio)."""
    slices = gguf_like_slices(path, nbytes, 4 * MIB)
    pairs, read = [], 512 * MIB
    for r in range(rounds):
        raw_first = r % 2 == 0  # alternate who goes first: the disk drifts and bursts
        if raw_first:
            raw = raw_direct_gbps(path, read, start=_region(r, nbytes, read))
        pager, _ = pager_gbps(path, slices, "random", DEFAULT_THREADS, read, seed=100 + r)
        if not raw_first:
            raw = raw_direct_gbps(path, read, start=_region(r, nbytes, read))
        pairs.append((pager, raw, pager / raw))
    return tuple(statistics.median(p[i] for p in pairs) for i in range(3))


def hit_us(path: str, slices: dict, calls: int = 200_000) -> float:
    """Median over batches of the per-call time of `with cache.pin(key): pass` on resident slices."""
    keys = list(slices)[:8]
    with SliceCache({k: slices[k] for k in keys}, budget=10**9, threads=1) as cache:
        for k in keys:
            with cache.pin(k):
                pass
        batch, means = 1000, []
        for b in range(calls // batch):
            key = keys[b % len(keys)]
            t0 = time.perf_counter()
            for _ in range(batch):
                with cache.pin(key):
                    pass
            means.append((time.perf_counter() - t0) / batch * 1e6)
    return statistics.median(means)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--path", default="/tmp/expertpager-bench-io.bin")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--case-mib", type=int, default=768, help="bytes read per case")
    ap.add_argument("--keep", action="store_true", help="keep the scratch file")
    args = ap.parse_args()
    nbytes = int(args.gib * 2**30)
    if not (os.path.exists(args.path) and os.path.getsize(args.path) == nbytes):
        write_file(args.path, nbytes)
    try:
        rows, raws, raw_bytes = [], [], min(nbytes // 2, 2**30)
        for i, size in enumerate(SIZES):
            raws.append(raw_direct_gbps(args.path, raw_bytes, _region(1000 + i, nbytes, raw_bytes)))
            slices = gguf_like_slices(args.path, nbytes, size)
            for order in ("sequential", "random"):
                for threads in THREADS:
                    gbps, waste = pager_gbps(args.path, slices, order, threads, args.case_mib * MIB)
                    rows.append((size, order, threads, gbps, waste))
        raws.append(raw_direct_gbps(args.path, raw_bytes, _region(2000, nbytes, raw_bytes)))
        raw = statistics.mean(raws)
        pager, raw_paired, ratio = paired_ratio(args.path, nbytes, rounds=7)
        hit = hit_us(args.path, gguf_like_slices(args.path, nbytes, MIB))
    finally:
        if not args.keep:
            os.unlink(args.path)

    print(f"raw O_DIRECT sequential 4 MiB reads, 1 thread, GB/s (before each size, and at the end): "
          f"{' '.join(f'{r:.2f}' for r in raws)}; mean {raw:.2f}")
    print(f"{'slice':>8} {'order':>10} {'threads':>7} {'GB/s':>6} {'x raw':>6} {'wasted':>6}   (x raw: over the mean raw figure)")
    for size, order, threads, gbps, waste in rows:
        print(f"{size // 1024:>6}Ki {order:>10} {threads:>7} {gbps:>6.2f} {gbps / raw:>6.2f} {waste:>6.0%}")
    print(f"hit (pin + release of a resident slice): {hit:.2f} us median")
    pick = {(s, o, t): g for s, o, t, g, _ in rows}
    big_random = [g / raw for (s, o, t), g in pick.items() if s >= 2 * MIB and o == "random" and t == DEFAULT_THREADS]
    print(f"paired rounds, 4 MiB slices, random order, {DEFAULT_THREADS} threads: pager {pager:.2f} GB/s, "
          f"raw {raw_paired:.2f} GB/s, median ratio {ratio:.2f}")
    print(json.dumps({
        "bench": "io", "pager_gbps": round(pager, 3), "raw_gbps": round(raw_paired, 3), "ratio": round(ratio, 3),
        "table_min_ratio_random_ge_2mib": round(min(big_random), 3), "hit_us_median": round(hit, 3),
        "raw_gbps_min": round(min(raws), 3), "raw_gbps_max": round(max(raws), 3),
        "threads": DEFAULT_THREADS, "file_gib": args.gib,
    }))


if __name__ == "__main__":
    main()
