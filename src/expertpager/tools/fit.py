"""`plan`: what a model needs under a RAM (and store disk) budget, from headers only, and a predicted decode speed.

Miss rates come from a routing trace (replayed through the pager's own cache and policy), a domain profile (a cache
holding the hottest slices: the share of uses they take) or, with neither, uniform routing (the cache fraction). The
store on disk is taken to hold the hottest slices that fit its budget. Time per token = compute (measured decode
tokens/s with every slice in RAM, or the memory-bandwidth bound: bytes touched per token / memory bandwidth) +
bytes from the disk store / disk bandwidth + bytes from the network / network bandwidth + the network requests'
latency, overlapped over `threads` parallel reads."""

import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..model.layout import Layout
from ..pager.io import Files
from ..pager.reads import plan_reads
from ..pager.replay import replay_steps
from ..runtime.load import memory_plan
from ..runtime.profiles import Profile
from ..sizes import parse_size
from .routing_stats import expert_counts
from .simulate import trace_steps
from .trace import Trace

SAMPLE_BYTES = 64 << 20


@dataclass
class Bandwidths:
    """Measured or given: bytes per second of the disk (store or local checkpoint), the network, and memory;
    seconds of one network request's latency."""

    disk: float
    memory: float
    network: float = 0.0
    latency: float = 0.0


@dataclass
class FitPlan:
    ram: int | None
    disk: int | None
    fits: bool
    resident_bytes: int
    reserve_bytes: int
    cache_bytes: int
    cache_slices: int
    cache_fraction: float
    num_slices: int
    slice_bytes: int
    bytes_per_token: int  # expert bytes touched per token
    routing: str  # "trace", "profile" or "uniform"
    hit_rate: float  # RAM cache
    miss_bytes_per_token: float  # RAM misses, whoever serves them
    store_slices: int | None  # remote: slices the store's disk budget holds
    store_share: float  # of RAM misses, the share the store (or local disk) serves
    network_bytes_per_token: float
    network_requests_per_token: float
    compute_tokens_per_s: float
    predicted_tokens_per_s: float
    bandwidths: dict

    def to_dict(self) -> dict:
        return asdict(self)


def popularity(layout: Layout, profile: Profile | None, trace: Trace | None) -> np.ndarray:
    """Uses per token of every slice, hottest first (uniform when neither a profile nor a trace is given)."""
    if trace is not None:
        counts, tokens = expert_counts(trace), trace.num_tokens
    elif profile is not None:
        counts, tokens = profile.counts, profile.tokens
    else:
        return np.full(len(layout.slices), layout.experts_per_token / layout.num_experts)
    return np.sort(counts.reshape(-1).astype(np.float64) / max(tokens, 1))[::-1]


def plan_fit(layout: Layout, ram: str | int | None, disk: int | None, remote: bool, bw: Bandwidths,
             profile: Profile | None = None, trace: Trace | None = None, compute_tps: float | None = None,
             policy: str = "lru", threads: int = 4, fixed_disk_bytes: int = 0, cache: str | None = None) -> FitPlan:
    """The plan for `layout` under a whole-process RAM promise `ram` (or an expert cache of `cache`, as `load`
    takes it) and, for a remote model, a store budget `disk` (None: unlimited) of which `fixed_disk_bytes` go to
    headers and resident tensors."""
    mem = memory_plan(layout, ram, cache=cache)
    n, k, layers = len(layout.slices), layout.experts_per_token, len(layout.moe_layers)
    mean_slice = layout.expert_bytes / n
    uses = k * layers
    pop = popularity(layout, profile, trace)
    mass = np.concatenate([[0.0], np.cumsum(pop)]) / pop.sum()
    slots = max(0, min(n, mem.cache_slices)) if mem.fits else 0
    if trace is not None and mem.fits:
        r = replay_steps(trace_steps(trace), layout.slices, mem.cache_bytes - mem.staging_bytes, policy, k)
        hit, routing = r.hit_rate, "trace"
    else:
        hit, routing = float(mass[slots]), "profile" if profile is not None else "uniform"
    miss_uses = uses * (1 - hit)
    store_slots, store_share = None, 1.0
    if remote:
        store_slots = n if disk is None else int(max(0, min(n, (disk - fixed_disk_bytes) // layout.slice_bytes)))
        beyond = 1 - mass[max(store_slots, slots)]
        store_share = 1 - min(1.0, beyond * uses / miss_uses) if miss_uses else 1.0
    net_uses = miss_uses * (1 - store_share)
    compute = compute_tps or bw.memory / (layout.resident_bytes + uses * mean_slice)
    seconds = 1 / compute + miss_uses * store_share * mean_slice / bw.disk
    if net_uses:
        seconds += net_uses * mean_slice / bw.network + net_uses / min(threads, k) * bw.latency
    return FitPlan(parse_size(ram) if ram is not None else None, disk, mem.fits, mem.resident_bytes, mem.reserve_bytes, mem.cache_bytes, slots,
                   slots / n, n, layout.slice_bytes, int(uses * mean_slice), routing, hit, miss_uses * mean_slice,
                   store_slots, store_share, net_uses * mean_slice, net_uses, compute, 1 / seconds, asdict(bw))


def disk_bandwidth(layout: Layout | None = None, folder: str | None = None) -> float:
    """Bytes/s of uncached reads: expert slices of a local `layout` (up to SAMPLE_BYTES, spread over the file), or a
    file written and read back in `folder` (where a store lives), read with O_DIRECT where the filesystem allows."""
    if layout is not None:
        keys = sorted(layout.slices)
        step = max(1, len(keys) * layout.slice_bytes // SAMPLE_BYTES)
        plans = [plan_reads(layout.slices[k]) for k in keys[::step]]
        return _read_rate([r for p in plans for r in p.runs], max(p.slot_bytes for p in plans))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".bandwidth-") as f:
        f.write(os.urandom(1 << 20) * (SAMPLE_BYTES >> 20))
        f.flush()
        os.fsync(f.fileno())
        from ..pager.reads import Run

        runs = [Run(f.name, at, 4 << 20, 0, at, at + (4 << 20)) for at in range(0, SAMPLE_BYTES, 4 << 20)]
        return _read_rate(runs, 4 << 20)


def _read_rate(runs, slot_bytes: int) -> float:
    from ..pager.io import drop_page_cache
    from ..pager.pool import SlotPool

    for path in {r.file for r in runs}:
        drop_page_cache(path)
    files, pool = Files({r.file for r in runs}), SlotPool([max(slot_bytes, max(r.slot_offset + r.length for r in runs))])
    try:
        t0 = time.perf_counter()
        for r in runs:
            files.read(r, pool.slot(0))
        seconds = time.perf_counter() - t0
    finally:
        files.close()
        pool.close()
    return sum(r.need_end - r.need_start for r in runs) / max(seconds, 1e-9)


def memory_bandwidth() -> float:
    """Bytes/s of a large array copy (read + write counted once each)."""
    a = np.ones(SAMPLE_BYTES // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    return 3 * 2 * a.nbytes / (time.perf_counter() - t0)
