"""SliceCache: expert slices paged from disk into a fixed pool of slots, pinned while in use.

One lock guards all state. A hit is a dict lookup, a pin count and a policy touch, and returns a buffer object
built once when the slot was filled. Misses go to the workers ahead of any prefetch, and a caller waiting for
them takes back those no worker has started and reads them itself, so demand loads never wait behind queued
prefetches; `pin_each` hands out each slice as soon as it is ready, so compute overlaps the remaining reads.
Prefetches are queued keys that a worker starts only if a slot can be freed without touching pinned or loading
slices.
"""

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, SliceKey
from .decode import Decoder, staging_bytes
from .io import Files
from .policies import Policy, make_policy
from .pool import SlotPool, plan_slots
from .reads import ReadPlan, plan_reads
from .residency import Residency
from .stats import Stats, StatsSnapshot

Verify = Callable[[SliceKey, dict[str, np.ndarray]], None]
Source = Callable[[SliceKey], AbstractContextManager]


class SliceBuffer:
    """A pinned, loaded slice. `views[role]` is a uint8 array over exactly that part's bytes in the slot; it is
    valid until the buffer is released (leaving the `with` block, or `release()`)."""

    __slots__ = ("key", "views", "_cache", "_slot")

    def __init__(self, key: SliceKey, views: dict[str, np.ndarray], cache: "SliceCache", slot: "_Slot"):
        self.key, self.views, self._cache, self._slot = key, views, cache, slot

    def release(self) -> None:
        self._cache._release(self)

    def __enter__(self) -> "SliceBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self._cache._release(self)


class PinnedSlices(dict):
    """key -> SliceBuffer for several pinned slices; releases them all on exit."""

    def release(self) -> None:
        for buf in self.values():
            buf.release()
        self.clear()

    def __enter__(self) -> "PinnedSlices":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PinStream:
    """Slices being pinned together (`SliceCache.pin_each`): iterating yields `(key, buffer)` as each is ready;
    `pinned` holds those yielded so far. A failed load raises after the others finish, with every pin released.
    Leaving the `with` block (or `release()`) releases every pin, waiting for loads still in flight."""

    def __init__(self, cache: "SliceCache", hits: list, own: list["_Load"], joined: list["_Load"]):
        self.pinned = PinnedSlices()
        self._cache, self._hits, self._own = cache, hits, own
        self._pending = own + joined

    def __iter__(self) -> Iterator[tuple[SliceKey, SliceBuffer]]:
        while self._hits:
            key, buf = self._hits.pop(0)
            self.pinned[key] = buf
            yield key, buf
        errors = []
        while self._pending:
            load = self._take_done()
            if load.error is not None:
                errors.append(load.error)
                continue
            self.pinned[load.key] = load.slot.handle
            if not errors:
                yield load.key, load.slot.handle
        if errors:
            self.release()
            raise errors[0]

    def _take_done(self) -> "_Load":
        load = self._cache._next_done(self._pending, self._own)
        self._pending.remove(load)
        return load

    def release(self) -> None:
        for _, buf in self._hits:
            buf.release()
        self._hits = []
        while self._pending:
            load = self._take_done()
            if load.error is None:
                load.slot.handle.release()
        self.pinned.release()

    def __enter__(self) -> "PinStream":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Slot:
    __slots__ = ("index", "memory", "base", "key", "li", "pins", "handle", "prefetched")

    def __init__(self, index: int, memory: memoryview, base: int):
        self.index, self.memory, self.base = index, memory, base
        self.key: SliceKey | None = None
        self.li = 0
        self.pins = 0
        self.handle: SliceBuffer | None = None
        self.prefetched = False


class _Load:
    __slots__ = ("key", "slot", "done", "error")

    def __init__(self, key: SliceKey, slot: _Slot):
        self.key, self.slot = key, slot
        self.done = threading.Event()
        self.error: ExpertPagerError | None = None


class SliceCache:
    """Expert slices under a byte budget: `pin` (a context manager) blocks until the slice is loaded and keeps
    it resident while held; `prefetch` loads ahead in worker threads.

    slices: the layout's slices, keyed (layer, expert), and any adapter pieces, keyed (layer, expert, adapter): the
    same slots, policy and budget hold both, and `min_pinned` slots are kept for pieces too; budget: bytes for the slot pool (allocated and touched here, never grown);
    policy: "lru", "lfu", "cycle", or a Policy instance (Belady(trace) for replaying a known trace);
    io: "auto", "direct", "buffered+dontneed" or "buffered"; threads: prefetch workers; min_pinned: slots of the
    largest size the budget must hold; verify(key, views): called after each read, before the slice is served;
    wait_timeout: seconds a pin waits for a slot to be released before giving up; decode: a Decoder whose output
    the slots hold instead of the raw bytes for the keys it has views for (raw bytes go to staging buffers, counted
    in the budget, and are verified there before decoding); source(key): a context manager that makes the slice's
    files present while it is read (a local store of a remote checkpoint; its files are then opened per read, as the
    store may replace them); announce(keys): told, before their reads start, which slices a pin or a prefetch is about
    to read together (so the store can fetch neighbours in one request).
    """

    def __init__(
        self,
        slices: Mapping[SliceKey, ExpertSlice],
        budget: int,
        policy: "str | Policy" = "lru",
        io: str = "auto",
        threads: int = 4,
        min_pinned: int = 1,
        verify: Verify | None = None,
        wait_timeout: float = 60.0,
        decode: Decoder | None = None,
        source: Source | None = None,
        announce: Callable[[list[SliceKey]], None] | None = None,
    ):
        if not slices:
            raise ExpertPagerError("no expert slices to cache")
        self._slices = dict(slices)
        self._plans: dict[SliceKey, ReadPlan] = {k: plan_reads(s) for k, s in self._slices.items()}
        needs = {k: p.slot_bytes for k, p in self._plans.items()}
        stage_size, stages = 0, 0
        decoded = {k: n for k, n in needs.items() if decode is not None and k in decode.views}  # the rest as read
        if decode is not None and decode.in_place:
            needs = {k: max(n, decode.slot_bytes(k)) if k in decoded else n for k, n in needs.items()}
        elif decode is not None:
            stage_size, stages = staging_bytes(decoded, threads)
            needs = {k: decode.slot_bytes(k) if k in decoded else n for k, n in needs.items()}
        self.staging_bytes = stage_size * stages
        # Adapter pieces, pinned beside their experts' slices: slots are planned for one adapter's pieces (one run
        # uses one adapter), so many loaded adapters do not take the budget from the expert slices.
        pieces: dict[SliceKey, int] = {}
        for k, n in needs.items():
            if len(k) > 2:
                pieces[k[:2]] = max(n, pieces.get(k[:2], 0))
        planned = [n for k, n in needs.items() if len(k) == 2] + list(pieces.values())
        slot_sizes = plan_slots(planned, budget, min_pinned, self.staging_bytes, max(pieces.values(), default=0))
        self._files = Files({r.file for p in self._plans.values() for r in p.runs}, io, keep_open=source is None)
        self._source = source or (lambda key: nullcontext())
        self._announce = announce or (lambda keys: None)
        self._pool = SlotPool(slot_sizes + [stage_size] * stages)
        self._slots = [_Slot(i, self._pool.slot(i), self._pool.offsets[i]) for i in range(len(slot_sizes))]
        self._decode = decode
        self._staging = [(self._pool.slot(i), self._pool.offsets[i]) for i in range(len(slot_sizes), len(self._pool.sizes))]
        self._stages: queue.SimpleQueue[tuple[memoryview, int]] = queue.SimpleQueue()
        for stage in self._staging:
            self._stages.put(stage)
        self._book = Residency(needs, slot_sizes, make_policy(policy))
        self._touch = self._book.policy.touch
        self._stats = Stats(self._slices)
        self._count = self._stats.counters
        self._verify = verify
        self._wait_timeout = wait_timeout

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._freed = threading.Condition(self._lock)
        self._landed = threading.Condition(self._lock)
        self._slot_waiters = 0
        self._ready: dict[SliceKey, _Slot] = {}
        self._loading: dict[SliceKey, _Load] = {}
        self._queued: OrderedDict[SliceKey, None] = OrderedDict()
        self._demand: deque[_Load] = deque()
        self._closed = False
        self._workers = [threading.Thread(target=self._work_loop, name=f"expertpager-io-{i}", daemon=True) for i in range(threads)]
        for t in self._workers:
            t.start()

    # -- facts ---------------------------------------------------------------------------------------------

    @property
    def pool_bytes(self) -> int:
        """Bytes in the slot pool, staging buffers included; never more than the budget."""
        return self._pool.nbytes

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def slot_sizes(self) -> list[int]:
        return list(self._pool.sizes[: len(self._slots)])

    @property
    def io_modes(self) -> dict[str, str]:
        """The effective I/O mode of each file."""
        return dict(self._files.modes)

    @property
    def policy(self) -> Policy:
        return self._book.policy

    def resident(self) -> list[SliceKey]:
        """Keys loaded and ready now."""
        with self._lock:
            return list(self._ready)

    def occupancy(self) -> dict[SliceKey, tuple[int, int]]:
        """Each slice loaded now -> (its slot's bytes, pins held on it), read together under the lock."""
        with self._lock:
            return {k: (self._pool.sizes[s.index], s.pins) for k, s in self._ready.items()}

    def stats_snapshot(self) -> StatsSnapshot:
        with self._lock:
            return self._stats.snapshot()

    @property
    def stats(self) -> StatsSnapshot:
        return self.stats_snapshot()

    def reset_stats(self) -> None:
        """Count afresh from now (for example after loading every slice, to report a fully resident run)."""
        with self._lock:
            for values in self._count.values():
                values[:] = [0] * len(values)

    # -- pinning -------------------------------------------------------------------------------------------

    def pin(self, key: SliceKey) -> SliceBuffer:
        """Pin one slice, loading it if needed; use as `with cache.pin(key) as buf:` or call `buf.release()`."""
        with self._lock:
            slot = self._ready.get(key)
            if slot is not None:
                slot.pins += 1
                self._touch(key)
                self._count["hits"][slot.li] += 1
                if slot.prefetched:
                    slot.prefetched = False
                    self._count["prefetch_hits"][slot.li] += 1
                return slot.handle
        return self.pin_many((key,))[key]

    def pin_many(self, keys: Iterable[SliceKey], prefetch: Iterable[SliceKey] = ()) -> PinnedSlices:
        """Pin several slices at once, loading the missing ones in parallel; `with cache.pin_many(keys) as bufs:`.
        `prefetch` keys are queued once `keys` are claimed, behind their loads (see `pin_each`)."""
        stream = self.pin_each(keys, prefetch)
        for _ in stream:
            pass
        return stream.pinned

    def pin_each(self, keys: Iterable[SliceKey], prefetch: Iterable[SliceKey] = ()) -> "PinStream":
        """Pin several slices and yield `(key, buffer)` as each becomes ready: resident ones first, then loads in the
        order they finish, so the caller can compute on some while others are read. Every key is claimed (pinned,
        or given a slot) before this returns; `prefetch` keys are queued after that, so they never evict `keys`,
        and behind `keys`' own loads. `with cache.pin_each(keys) as stream: for key, buf in stream: ...`;
        `stream.pinned` holds the slices yielded so far, all released on exit."""
        keys = tuple(dict.fromkeys(tuple(k) for k in keys))
        with self._lock:
            self._check(keys)
            if len(keys) > len(self._slots):
                raise ExpertPagerError(f"cannot pin {len(keys)} slices at once: the cache has {len(self._slots)} slots")
            hits, own, joined = self._claim(keys)
            if own:
                self._announce([load.key for load in own])
            self._demand.extend(own)
            self._work.notify(len(own))
        self.prefetch(prefetch)
        return PinStream(self, hits, own, joined)

    def _check(self, keys: tuple[SliceKey, ...]) -> None:
        if self._closed:
            raise ExpertPagerError("the slice cache is closed")
        for key in keys:
            if key not in self._plans:
                raise ExpertPagerError(f"no expert slice or adapter piece {key} in this cache")

    def _claim(self, keys: tuple[SliceKey, ...]) -> tuple[list[tuple[SliceKey, SliceBuffer]], list[_Load], list[_Load]]:
        """Under the lock: pin every key, starting loads for the missing ones once slots for all are found. Returns
        (resident keys and their buffers, loads started here, loads in flight that these pins joined)."""
        wanted = set(keys)
        deadline = time.monotonic() + self._wait_timeout
        while True:
            missing = [k for k in keys if k not in self._ready and k not in self._loading]
            missing.sort(key=lambda k: -self._book.needs[k])  # largest first: a small one must not take its slot
            placed = []
            for key in missing:
                slot = self._place(key, lambda k: k not in wanted)
                if slot is None:
                    break
                placed.append((key, slot))
            if len(placed) == len(missing):
                break
            for key, _ in placed:
                self._book.remove(key)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExpertPagerError(
                    f"no slot for {len(missing)} slice(s) after {self._wait_timeout:.0f} s: all {len(self._slots)} "
                    "slots are pinned or loading; release pins or raise the budget"
                )
            self._slot_waiters += 1
            self._freed.wait(left)
            self._slot_waiters -= 1
            self._check(keys)
        hits, own, joined = [], [], []
        for key in keys:
            slot = self._ready.get(key)
            if slot is not None:
                self._count["hits"][slot.li] += 1
                self._touch(key)
                hits.append((key, slot.handle))
            elif key in self._loading:
                slot = self._loading[key].slot
                self._count["joins"][slot.li] += 1
                self._touch(key)
                joined.append(self._loading[key])
            else:
                continue
            slot.pins += 1
            if slot.prefetched:
                slot.prefetched = False
                self._count["prefetch_hits"][slot.li] += 1
        for key, slot in placed:
            if key in self._queued:
                del self._queued[key]
                self._stats.add("prefetch_cancelled", key)
            slot.pins = 1
            load = self._start(key, slot)
            self._count["misses"][slot.li] += 1
            self._touch(key)
            own.append(load)
        return hits, own, joined

    def _place(self, key: SliceKey, allowed: Callable[[SliceKey], bool]) -> _Slot | None:
        """Under the lock: a slot for `key`, evicting an unpinned ready slice that `allowed` lets go if needed."""
        ready = self._ready
        placed = self._book.place(key, lambda k: k in ready and ready[k].pins == 0 and allowed(k))
        if placed is None:
            return None
        index, victim = placed
        slot = self._slots[index]
        if victim is not None:
            del ready[victim]
            self._count["evictions"][slot.li] += 1
            if slot.prefetched:
                self._count["prefetch_wasted"][slot.li] += 1
            slot.handle = None
        slot.key, slot.li, slot.pins, slot.prefetched = key, self._stats.row(key), 0, False
        return slot

    def _start(self, key: SliceKey, slot: _Slot) -> _Load:
        load = _Load(key, slot)
        self._loading[key] = load
        return load

    def _release(self, buf: SliceBuffer) -> None:
        with self._lock:
            slot = buf._slot
            if slot.handle is not buf or slot.pins <= 0:
                raise ExpertPagerError(f"slice {buf.key} released more often than pinned")
            slot.pins -= 1
            if slot.pins == 0 and self._slot_waiters:
                self._freed.notify_all()

    # -- loading -------------------------------------------------------------------------------------------

    def _next_done(self, pending: list[_Load], own: list[_Load]) -> _Load:
        """Block until one of `pending` has finished and return it; while waiting, run any of `own` (demand loads
        this caller started) that no worker has taken yet. The time blocked counts as stall time."""
        start = time.perf_counter()
        while True:
            with self._lock:
                done = next((l for l in pending if l.done.is_set()), None)
                if done is not None:
                    self._stats.add("stall_seconds", done.key, time.perf_counter() - start)
                    return done
                take = next((l for l in own if l in self._demand), None)
                if take is not None:
                    self._demand.remove(take)
                else:
                    self._landed.wait()
            if take is not None:
                self._run(take)

    def _run(self, load: _Load) -> None:
        """Read a slice into its slot (or a staging buffer, then decode it into the slot), verify the bytes read,
        and publish the slice (or the error) to everyone waiting on it."""
        key, slot = load.key, load.slot
        t0 = time.perf_counter()
        error, views = None, None
        try:
            if self._decode is None or key not in self._decode.views:
                views = self._read(key, slot.memory, slot.base)
            else:
                stage = (slot.memory, slot.base) if self._decode.in_place else self._stages.get()
                try:
                    raw = self._read(key, *stage)
                    views = self._views(slot.base, self._decode.views[key])
                    try:
                        self._decode.decode(key, raw, views)
                    except Exception as e:
                        raise ExpertPagerError(f"decoding expert slice {key} failed: {e!r}") from e
                finally:
                    if not self._decode.in_place:
                        self._stages.put(stage)
        except ExpertPagerError as e:
            error = e
        except Exception as e:
            error = ExpertPagerError(f"loading expert slice {key} failed: {e!r}")
        seconds = time.perf_counter() - t0
        with self._lock:
            del self._loading[key]
            if error is None:
                slot.handle = SliceBuffer(key, views, self, slot)
                self._ready[key] = slot
                self._count["bytes_read"][slot.li] += self._slices[key].nbytes
                self._count["read_seconds"][slot.li] += seconds
            else:
                self._count["load_errors"][slot.li] += 1
                self._book.remove(key)
                slot.key, slot.pins, slot.prefetched, slot.handle = None, 0, False, None
            load.error = error
            load.done.set()
            self._landed.notify_all()
            if self._slot_waiters:
                self._freed.notify_all()

    def _read(self, key: SliceKey, memory: memoryview, base: int) -> dict[str, np.ndarray]:
        """Read the slice's raw bytes into `memory` (at pool offset `base`) and verify them; the parts' views by role."""
        with self._source(key):
            for run in self._plans[key].runs:
                self._files.read(run, memory)
        views = self._views(base, self._plans[key].views)
        if self._verify is not None:
            self._verify(key, views)
        return views

    def _views(self, base: int, parts: tuple[tuple[str, int, int], ...]) -> dict[str, np.ndarray]:
        return {role: self._pool.array[base + off : base + off + n] for role, off, n in parts}

    # -- prefetching ---------------------------------------------------------------------------------------

    def prefetch(self, keys: Iterable[SliceKey]) -> None:
        """Queue loads in the background; a later pin joins them. Keys resident, loading or queued are skipped."""
        with self._lock:
            self._check(())
            new = []
            for key in keys:
                key = tuple(key)
                if key not in self._plans:
                    raise ExpertPagerError(f"no expert slice or adapter piece {key} in this cache")
                if key not in self._ready and key not in self._loading and key not in self._queued:
                    self._queued[key] = None
                    new.append(key)
            if new:
                self._announce(new)
                self._work.notify(len(new))

    def cancel_prefetches(self, keys: Iterable[SliceKey] | None = None) -> int:
        """Drop queued prefetches not yet started (all, or those for `keys`); returns how many were dropped."""
        with self._lock:
            dropped = list(self._queued) if keys is None else [tuple(k) for k in keys if tuple(k) in self._queued]
            for key in dropped:
                del self._queued[key]
                self._stats.add("prefetch_cancelled", key)
            return len(dropped)

    def _next_job(self) -> _Load | None:
        """Under the lock: the next load for a worker, demand first; None when closing."""
        while True:
            if self._closed:
                return None
            if self._demand:
                return self._demand.popleft()
            if self._queued:
                key, _ = self._queued.popitem(last=False)
                if key in self._ready or key in self._loading:
                    continue
                slot = self._place(key, lambda k: True)
                if slot is None:
                    self._stats.add("prefetch_dropped", key)
                    continue
                slot.prefetched = True
                self._count["prefetch_issued"][slot.li] += 1
                return self._start(key, slot)
            self._work.wait()

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                load = self._next_job()
            if load is None:
                return
            self._run(load)

    # -- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (loads in progress finish), close the files and free the pool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queued.clear()
            self._work.notify_all()
            self._freed.notify_all()
        for t in self._workers:
            t.join()
        with self._lock:
            self._ready.clear()
            for slot in self._slots:
                slot.handle = None
                slot.memory.release()
            for memory, _ in self._staging:
                memory.release()
        self._files.close()
        self._pool.close()

    def __enter__(self) -> "SliceCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
