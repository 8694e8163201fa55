"""Replay an access trace through the cache's own slot plan, residency bookkeeping and policy, without I/O."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..model.layout import ExpertSlice, SliceKey
from .policies import Policy, make_policy
from .pool import plan_slots
from .reads import BLOCK, plan_reads
from .residency import Residency
from .stats import Stats


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    hits: int
    misses: int
    bytes_read: int
    num_slots: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def slot_needs(slices: Mapping[SliceKey, ExpertSlice]) -> dict[SliceKey, int]:
    """The slot bytes each slice needs, as the live cache lays it out."""
    return {key: plan_reads(sl).slot_bytes for key, sl in slices.items()}


def replay(
    trace: Sequence[SliceKey],
    slices: Mapping[SliceKey, ExpertSlice] | Mapping[SliceKey, int] | int,
    budget: int,
    policy: "str | Policy" = "lru",
    min_pinned: int = 1,
) -> ReplayResult:
    """Count hits, misses and bytes read for `trace` under `budget`.

    `slices` is the layout's slices (slots sized exactly as SliceCache sizes them), or each key's size in bytes,
    or one size for all keys. Every access pins and releases one slice. For a cache with a decode step, pass the
    decoded slot sizes (`Decoder.slot_bytes`) and the budget less the cache's `staging_bytes`.
    """
    trace = [tuple(k) for k in trace]
    if isinstance(slices, int):
        slices = dict.fromkeys(trace, slices)
    if all(isinstance(v, ExpertSlice) for v in slices.values()):
        needs, sizes = slot_needs(slices), {k: s.nbytes for k, s in slices.items()}
    else:
        needs, sizes = {k: -(-int(v) // BLOCK) * BLOCK for k, v in slices.items()}, dict(slices)
    pol = make_policy(policy, trace)
    slot_sizes = plan_slots(list(needs.values()), budget, min_pinned)
    book = Residency(needs, slot_sizes, pol)
    stats = Stats(needs.keys())
    for key in trace:
        if key in book.slot_of:
            stats.add("hits", key)
        else:
            _, victim = book.place(key, lambda k: True)
            if victim is not None:
                stats.add("evictions", victim)
            stats.add("misses", key)
            stats.add("bytes_read", key, sizes[key])
        pol.touch(key)
    snap = stats.snapshot()
    return ReplayResult(pol.name, snap.hits, snap.misses, snap.bytes_read, len(slot_sizes))
