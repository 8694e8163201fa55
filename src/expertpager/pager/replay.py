"""Replay an access trace through the cache's own slot plan, residency bookkeeping and policy, without I/O."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ExpertPagerError
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
    prefetch_issued: int = 0
    prefetch_hits: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class Step:
    """Slices pinned together (as one `pin_many`), then slices prefetched while they are held.

    Replay treats a prefetch as arriving at once: the live cache may still be reading it when it is needed."""

    keys: tuple[SliceKey, ...]
    prefetch: tuple[SliceKey, ...] = ()


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
    return replay_steps([Step((tuple(k),)) for k in trace], slices, budget, policy, min_pinned)


def replay_steps(
    steps: Sequence[Step],
    slices: Mapping[SliceKey, ExpertSlice] | Mapping[SliceKey, int] | int,
    budget: int,
    policy: "str | Policy" = "lru",
    min_pinned: int = 1,
    warmup: int = 0,
) -> ReplayResult:
    """`replay` of steps: each pins its keys together, as the live cache's `pin_many` does, then queues its
    prefetches, which may evict anything but the held keys; a prefetched slice counts a hit when used. The first
    `warmup` steps are replayed but not counted."""
    trace = [k for step in steps for k in step.keys]
    if isinstance(slices, int):
        slices = dict.fromkeys(_all_keys(steps), slices)
    if all(isinstance(v, ExpertSlice) for v in slices.values()):
        needs, sizes = slot_needs(slices), {k: s.nbytes for k, s in slices.items()}
    else:
        needs, sizes = {k: -(-int(v) // BLOCK) * BLOCK for k, v in slices.items()}, dict(slices)
    pol = make_policy(policy, trace)
    slot_sizes = plan_slots(list(needs.values()), budget, min_pinned)
    book = Residency(needs, slot_sizes, pol)
    stats = Stats(needs.keys())
    prefetched: set[SliceKey] = set()
    base = None
    for i, step in enumerate(steps):
        if i == warmup:
            base = stats.snapshot()
        held = set(step.keys)
        for key in step.keys:
            if key in book.slot_of:
                stats.add("hits", key)
                if key in prefetched:
                    prefetched.discard(key)
                    stats.add("prefetch_hits", key)
            else:
                if not _place(book, stats, sizes, key, held, prefetched):
                    raise ExpertPagerError(f"replay: no slot can be freed for {key}; a step pins more keys than min_pinned")
                stats.add("misses", key)
            pol.touch(key)
        for key in step.prefetch:
            if key not in book.slot_of and _place(book, stats, sizes, key, held, prefetched):
                prefetched.add(key)
                stats.add("prefetch_issued", key)
    snap = stats.snapshot()
    base = base or snap
    return ReplayResult(pol.name, snap.hits - base.hits, snap.misses - base.misses, snap.bytes_read - base.bytes_read,
                        len(slot_sizes), snap.prefetch_issued - base.prefetch_issued,
                        snap.prefetch_hits - base.prefetch_hits)


def _all_keys(steps: Iterable[Step]) -> list[SliceKey]:
    return list(dict.fromkeys(k for step in steps for k in (*step.keys, *step.prefetch)))


def _place(book: Residency, stats: Stats, sizes: Mapping[SliceKey, int], key: SliceKey, held: set[SliceKey],
           prefetched: set[SliceKey]) -> bool:
    """Give `key` a slot, evicting a slice not in `held`; False when none can go."""
    placed = book.place(key, lambda k: k not in held)
    if placed is None:
        return False
    victim = placed[1]
    if victim is not None:
        stats.add("evictions", victim)
        prefetched.discard(victim)
    stats.add("bytes_read", key, sizes[key])
    return True
