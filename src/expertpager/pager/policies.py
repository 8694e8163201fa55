"""Eviction policies: which resident slice to drop when a slot is needed.

One interface serves the live cache and trace replay. The caller (Residency) reports `admit` when a key gets a
slot (on a miss or a prefetch), `touch` when a key is used (right after `admit` on a miss), `remove` when it
leaves, and asks `victim(evictable)` for the key to evict among those the predicate allows. One instance per
cache: policies hold per-key state.
"""

import heapq
import itertools
import math
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from ..errors import ExpertPagerError
from ..model.layout import SliceKey

Evictable = Callable[[SliceKey], bool]


class Policy:
    """Base class: subclasses keep their own order of resident keys."""

    name = "policy"

    def start(self, keys: Collection[SliceKey]) -> None:
        """Called once with every key the cache may hold."""

    def admit(self, key: SliceKey) -> None:
        raise NotImplementedError

    def touch(self, key: SliceKey) -> None:
        raise NotImplementedError

    def remove(self, key: SliceKey) -> None:
        raise NotImplementedError

    def victim(self, evictable: Evictable) -> SliceKey | None:
        raise NotImplementedError


class _LazyHeap:
    """A min-heap of (priority, key) whose stale entries (priority no longer current) are skipped, not deleted."""

    def __init__(self) -> None:
        self.heap: list[tuple] = []

    def push(self, prio: tuple, key: SliceKey) -> None:
        heapq.heappush(self.heap, (prio, key))

    def first(self, current: dict, evictable: Evictable) -> tuple | None:
        """The smallest current (priority, key) whose key is evictable, or None."""
        skipped, found = [], None
        heap = self.heap
        while heap:
            prio, key = heap[0]
            if current.get(key) != prio:
                heapq.heappop(heap)
            elif evictable(key):
                found = heap[0]
                break
            else:
                skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def compact(self, current: dict, keys: Collection[SliceKey]) -> None:
        """Rebuild from the current priorities of `keys` once stale entries pile up."""
        if len(self.heap) > 2 * len(keys) + 64:
            self.rebuild(current, keys)

    def rebuild(self, current: dict, keys: Collection[SliceKey]) -> None:
        """Only the current priorities of `keys`."""
        self.heap = [(current[k], k) for k in keys]
        heapq.heapify(self.heap)


class LRU(Policy):
    """Least recently used; admission counts as a use."""

    name = "lru"

    def __init__(self) -> None:
        self.order: OrderedDict[SliceKey, None] = OrderedDict()

    def admit(self, key: SliceKey) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def touch(self, key: SliceKey) -> None:
        self.order.move_to_end(key)

    def remove(self, key: SliceKey) -> None:
        del self.order[key]

    def victim(self, evictable: Evictable) -> SliceKey | None:
        return next((k for k in self.order if evictable(k)), None)


class LFU(Policy):
    """LFU with dynamic aging (LFU-DA): priority = L + uses, L = priority of the last evicted key; recency breaks ties.

    Aging lets once-hot slices leave when the mix changes. Admission counts as the first use, so a prefetched
    slice that is then used counts once.
    """

    name = "lfu"

    def __init__(self) -> None:
        self.uses: dict[SliceKey, int] = {}
        self.prio: dict[SliceKey, tuple[int, int]] = {}
        self.fresh: set[SliceKey] = set()
        self.age = 0
        self.tick = itertools.count()
        self.heap = _LazyHeap()

    def _push(self, key: SliceKey) -> None:
        p = (self.age + self.uses[key], next(self.tick))
        self.prio[key] = p
        self.heap.push(p, key)

    def admit(self, key: SliceKey) -> None:
        self.uses[key] = 1
        self.fresh.add(key)
        self._push(key)

    def touch(self, key: SliceKey) -> None:
        if key in self.fresh:
            self.fresh.discard(key)
        else:
            self.uses[key] += 1
        self._push(key)
        self.heap.compact(self.prio, self.prio.keys())

    def remove(self, key: SliceKey) -> None:
        self.age = max(self.age, self.prio.pop(key)[0])
        del self.uses[key]
        self.fresh.discard(key)

    def victim(self, evictable: Evictable) -> SliceKey | None:
        found = self.heap.first(self.prio, evictable)
        return None if found is None else found[1]


class LayerCycle(Policy):
    """MoE-aware: evict the slice whose next use is expected farthest away, as Belady would, estimated.

    A forward pass visits layers in a cycle, so a slice of layer l can next be used when layer l comes round
    again: d(l) in 1..n layers from the layer just used. Whether it is used then is estimated from an
    exponentially decayed count of the tokens that used it (p, kept across evictions, so a hot slice that was
    evicted is remembered). Expected distance = d(l) + n * (1/p - 1). Plain LRU instead evicts exactly the
    slices of the layer about to run (they are the oldest), the worst choice for a cyclic scan.

    A slice admitted but not yet used (a prefetch) is expected at its layer's next turn (p = 1) and counts no use
    until it is touched; if its layer's turn passes without a touch it falls back to its own count, so a
    mispredicted prefetch is soon evicted and a correct one is never evicted before it is used.
    """

    name = "cycle"

    def __init__(self, decay: float = 1 / 16) -> None:
        self.alpha = decay
        self.growth = 1 / (1 - decay)
        self.scale = 1.0
        self.token = 0
        self.cur = -1  # position of the layer used last
        self.pos: dict[int, int] = {}
        self.weight: dict[SliceKey, float] = {}  # sum of scale at each use; p = alpha * weight / scale
        self.last: dict[SliceKey, int] = {}  # token of the last counted use
        self.prio: dict[SliceKey, tuple[float, int]] = {}
        self.waiting: dict[SliceKey, tuple[int, int]] = {}  # admitted, not yet used: (token, position) of its turn
        self.heaps: dict[int, _LazyHeap] = {}
        self.members: dict[int, set[SliceKey]] = {}
        self.tick = itertools.count()

    def start(self, keys: Collection[SliceKey]) -> None:
        for layer in {k[0] for k in keys}:
            self._layer(layer)

    def _layer(self, layer: int) -> int:
        if layer not in self.pos:
            self.pos[layer] = -1
            self.pos = {l: i for i, l in enumerate(sorted(self.pos))}
            self.heaps[layer], self.members[layer] = _LazyHeap(), set()
        return self.pos[layer]

    def _set(self, key: SliceKey, weight: float) -> None:
        p = (weight, next(self.tick))
        self.prio[key] = p
        self.heaps[key[0]].push(p, key)

    def admit(self, key: SliceKey) -> None:
        at = self._layer(key[0])
        self.members[key[0]].add(key)
        self.waiting[key] = (self.token + (at <= self.cur), at)
        self._set(key, math.inf)

    def touch(self, key: SliceKey) -> None:
        at = self._layer(key[0])
        if at < self.cur:
            self._next_token()
        self.cur = at
        self.waiting.pop(key, None)
        for k, turn in list(self.waiting.items()):
            if (self.token, at) > turn:  # its layer's turn passed unused
                del self.waiting[k]
                self._set(k, self.weight.get(k, 0.0))
        if self.last.get(key) != self.token:
            self.last[key] = self.token
            self.weight[key] = self.weight.get(key, 0.0) + self.scale
        self._set(key, self.weight[key])
        self.heaps[key[0]].compact(self.prio, self.members[key[0]])

    def _next_token(self) -> None:
        self.token += 1
        self.scale *= self.growth
        if self.scale > 1e100:
            self.weight = {k: w / self.scale for k, w in self.weight.items()}
            self.scale = 1.0
            self.prio = {k: (w if k in self.waiting else self.weight.get(k, 0.0), t) for k, (w, t) in self.prio.items()}
            for layer, heap in self.heaps.items():
                heap.rebuild(self.prio, self.members[layer])

    def remove(self, key: SliceKey) -> None:
        del self.prio[key]
        self.members[key[0]].discard(key)
        self.waiting.pop(key, None)

    def victim(self, evictable: Evictable) -> SliceKey | None:
        n = len(self.pos)
        best, best_score = None, -1.0
        for layer, heap in self.heaps.items():
            if not self.members[layer]:
                continue
            found = heap.first(self.prio, evictable)
            if found is None:
                continue
            p = min(max(self.alpha * found[0][0] / self.scale, 1e-9), 1.0)
            score = (self.pos[layer] - self.cur - 1) % n + 1 + n * (1 / p - 1)
            if score > best_score:
                best, best_score = found[1], score
        return best


class Belady(Policy):
    """Belady's MIN: evict the key whose next use in the known future trace is farthest. The offline optimum
    for equal-size slices; each `touch` advances one step along the trace."""

    name = "belady"

    def __init__(self, trace: Sequence[SliceKey]) -> None:
        self.uses: dict[SliceKey, list[int]] = {}
        for i, key in enumerate(trace):
            self.uses.setdefault(tuple(key), []).append(i)
        self.t = 0
        self.prio: dict[SliceKey, tuple[float, int]] = {}
        self.heap = _LazyHeap()
        self.tick = itertools.count()

    def _push(self, key: SliceKey, index: int) -> None:
        uses = self.uses.get(key, ())
        nxt = uses[index] if index < len(uses) else math.inf
        p = (-nxt, next(self.tick))
        self.prio[key] = p
        self.heap.push(p, key)

    def admit(self, key: SliceKey) -> None:
        self._push(key, bisect_left(self.uses.get(key, ()), self.t))

    def touch(self, key: SliceKey) -> None:
        self._push(key, bisect_right(self.uses.get(key, ()), self.t))
        self.t += 1
        self.heap.compact(self.prio, self.prio.keys())

    def remove(self, key: SliceKey) -> None:
        del self.prio[key]

    def victim(self, evictable: Evictable) -> SliceKey | None:
        found = self.heap.first(self.prio, evictable)
        return None if found is None else found[1]


POLICIES = {"lru": LRU, "lfu": LFU, "cycle": LayerCycle, "belady": Belady}


def make_policy(policy: "str | Policy", trace: Sequence[SliceKey] | None = None) -> Policy:
    """A Policy instance from a name (lru, lfu, cycle, belady) or an instance; belady needs the future trace."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ExpertPagerError(f"unknown cache policy {policy!r}: use one of {', '.join(POLICIES)}")
    if policy == "belady":
        if trace is None:
            raise ExpertPagerError("the belady policy needs the future access trace: pass Belady(trace)")
        return Belady(trace)
    return POLICIES[policy]()
