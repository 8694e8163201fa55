"""The local store of a remote checkpoint: its skeleton (headers, small files, resident tensors fetched once) and
one file per expert slice fetched so far, under a disk budget. A slice the pager misses is looked up here and, if
absent, fetched by HTTP range, verified (its SHA-256 where the checkpoint is a repacked one with a manifest, else
every byte of its length), written under a temporary name and renamed. Slices the pager announces together (a layer's
misses, a prefetch) and `fetch_many` (pull) are fetched with their remote neighbours: byte ranges closer than
http.COALESCE_GAP come in one range request (at most http.MAX_REQUEST bytes), split into their files. Over budget, the least recently used slices
not being read are deleted (recency survives between runs as the files' mtimes). Offline, only what the store holds is used, and a missing slice is named.
Once the store holds every byte of a weight file whose SHA-256 the server publishes, `verify_files` checks the whole
file against it, once (recorded in store.json); on a mismatch the file's slices are dropped, to be fetched again."""

import json
import os
import threading
import time
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, Layout, SliceKey, TensorPart
from ..model.manifest import slice_digest
from ..model.read_layout import read_layout
from ..pager.reads import plan_reads
from .http import COALESCE_GAP, MAX_REQUEST, RangeClient, coalesce
from .lock import bump, delete_unless_held, generation, hold_shared, store_locked
from .refs import RemoteFile, RemoteModel
from .skeleton import fetch_ranges, header_end, pwrite_all, skeleton_bytes, write_atomic
from .verify import Piece, file_sha256

STORE_FILE = "store.json"
SLICES = "slices"
ANNOUNCED = 4  # batches of announced keys a fetch may take neighbours from (a layer's misses and its prefetches)


@dataclass
class StoreStats:
    """Store counters: lookups served from disk (hits) or fetched (misses), bytes fetched remotely (slices, headers,
    resident), seconds spent fetching (summed over threads), requests, retries and evictions."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    remote_bytes: int = 0
    remote_seconds: float = 0.0
    remote_requests: int = 0
    remote_retries: int = 0
    store_bytes: int = 0
    disk_budget: int | None = None

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        return {"store_hits": self.hits, "store_misses": self.misses, "store_hit_rate": self.hit_rate,
                "store_evictions": self.evictions, "remote_bytes": self.remote_bytes,
                "remote_seconds": self.remote_seconds, "remote_requests": self.remote_requests,
                "remote_retries": self.remote_retries, "store_bytes": self.store_bytes, "disk_budget": self.disk_budget}


@dataclass(frozen=True)
class _Source:
    """Where a store slice's bytes come from: per run, (remote file, [start, end) of the remote file, offset in the
    slice file)."""

    runs: tuple[tuple[RemoteFile, int, int, int], ...]
    size: int
    sha256: str | None


class Store:
    """A remote checkpoint's local store in `folder`. `layout` is the checkpoint as the pager reads it: resident
    tensors in the skeleton, each expert slice in its own file (parts at their remote offsets modulo 4 KiB, so
    alignment, and with it every result, is that of the local checkpoint). `hold(key)` makes a slice's file present
    and keeps it while held; `announce(keys)` tells it which lookups are coming, so one fetch can serve several."""

    def __init__(self, folder: Path, model: RemoteModel, layout: Layout, fixed_bytes: int, disk: int | None,
                 client: RangeClient, offline: bool):
        self.folder, self.model, self.client, self.offline = folder, model, client, offline
        self.remote_layout = layout
        self.disk = disk
        self._fixed = fixed_bytes
        self._lock = threading.Lock()
        self._held: dict[SliceKey, int] = {}
        self._fetching: dict[SliceKey, threading.Event] = {}
        self._announced: deque[set[SliceKey]] = deque(maxlen=ANNOUNCED)
        self._ahead: set[SliceKey] = set()  # fetched along with a neighbour, not looked up yet
        self._stats = StoreStats(disk_budget=disk)
        by_path = {str(folder / n): model.files[n] for n in model.weights}
        self._sources: dict[SliceKey, _Source] = {}
        slices: dict[SliceKey, ExpertSlice] = {}
        for key, s in layout.slices.items():
            slices[key], self._sources[key] = self._local_slice(s, by_path, layout.checksums.get(key))
        self.layout = replace(layout, slices=slices, files=sorted({t.file for t in layout.resident}))
        self._check_budget(0)
        self._present: OrderedDict[SliceKey, int] = OrderedDict()
        self._generation = -1  # of the slice files (lock.generation) that _present reflects
        with store_locked(folder) as fd, self._lock:
            self._refresh(fd)
            self._make_room(0, None, fd)  # the budget may be smaller than last time

    # -- layout ----------------------------------------------------------------------------------------------

    def slice_size(self, key: SliceKey) -> int:
        """Bytes the slice's store file takes."""
        return self._sources[key].size

    def slice_path(self, key: SliceKey) -> Path:
        return self.folder / SLICES / f"{key[0]:04d}-{key[1]:04d}.bin"

    def _local_slice(self, s: ExpertSlice, by_path: dict[str, RemoteFile], sha: str | None) -> tuple[ExpertSlice, _Source]:
        """The slice as its store file holds it: the read plan's slot image (runs back to back, each at its 4 KiB
        block), so each part keeps its remote offset modulo 4 KiB."""
        plan, path = plan_reads(s), str(self.slice_path(s.key))
        parts, runs = [], []
        for run in plan.runs:
            runs.append((by_path[run.file], run.need_start, run.need_end, run.slot_offset + run.need_start - run.start))
        for p in s.parts:
            run = next(r for r in plan.runs if r.file == p.file and r.need_start <= p.offset < r.need_end)
            parts.append(replace(p, file=path, offset=run.slot_offset + p.offset - run.start))
        size = max(at + end - start for _, start, end, at in runs)
        return ExpertSlice(s.layer, s.expert, tuple(sorted(parts, key=lambda p: p.offset))), _Source(tuple(runs), size, sha)

    def _refresh(self, fd: int) -> None:
        """Under both locks (lock fd): reread the slice files if another process (or Store) changed them."""
        if generation(fd) != self._generation:
            self._present = self._scan()
            self._ahead &= set(self._present)
            self._generation = generation(fd)

    def _scan(self) -> "OrderedDict[SliceKey, int]":
        """Under the folder's lock: slices in the store (complete files only: they were renamed into place), oldest
        use first; what a write cut short left is deleted."""
        found = []
        folder = self.folder / SLICES
        for entry in os.scandir(folder) if folder.is_dir() else ():
            if entry.name.startswith("."):
                os.unlink(entry.path)  # a fetch cut short
                continue
            try:
                key = tuple(int(x) for x in entry.name.removesuffix(".bin").split("-"))
            except ValueError:
                continue
            st = entry.stat()
            if key in self._sources and st.st_size == self._sources[key].size:
                found.append((st.st_mtime, key, st.st_size))
            else:
                os.unlink(entry.path)
        return OrderedDict((key, size) for _, key, size in sorted(found))

    # -- facts -------------------------------------------------------------------------------------------------

    @property
    def fixed_bytes(self) -> int:
        """Bytes the store needs besides slices: headers, small files and the resident tensors (fetched or not)."""
        return self._fixed + (0 if self._meta().get("resident") else sum(t.length for t in self.remote_layout.resident))

    @property
    def used_bytes(self) -> int:
        return self._fixed + sum(self._present.values())

    def present(self) -> list[SliceKey]:
        with self._lock:
            return list(self._present)

    def missing(self) -> list[SliceKey]:
        with self._lock:
            return [k for k in self._sources if k not in self._present]

    def stats(self) -> StoreStats:
        t = self.client.transfer
        with self._lock:
            s = replace(self._stats, store_bytes=self.used_bytes)
        s.remote_bytes, s.remote_seconds, s.remote_requests, s.remote_retries = t.bytes, t.seconds, t.requests, t.retries
        return s

    # -- slices ------------------------------------------------------------------------------------------------

    @contextmanager
    def hold(self, key: SliceKey) -> Iterator[None]:
        """Make the slice's file present (fetching it if absent) and keep it from eviction, by this process or
        another one sharing the store, while held. Other keys the pager reads (an adapter's pieces, in their own
        local file) pass through."""
        if key not in self._sources:
            yield
            return
        with self._lock:
            self._held[key] = self._held.get(key, 0) + 1
        try:
            while True:
                self.ensure(key)
                fd = hold_shared(self.slice_path(key))
                if fd is not None:
                    break
                with self._lock:  # another process evicted it meanwhile
                    self._present.pop(key, None)
            try:
                yield
            finally:
                os.close(fd)
        finally:
            with self._lock:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]

    def announce(self, keys: Iterable[SliceKey]) -> None:
        """Be told that `keys` will be looked up soon (a layer's misses, a prefetch): a lookup that has to fetch takes
        along those of them whose remote bytes lie next to its own (see _groups). The last ANNOUNCED batches count."""
        with self._lock:
            self._announced.append({k for k in keys if k in self._sources and k not in self._present})

    def ensure(self, key: SliceKey) -> bool:
        """Make the slice's file present; True when it had to be fetched (with its announced neighbours)."""
        while True:
            with self._lock:
                if key in self._present:
                    self._present.move_to_end(key)
                    if key in self._ahead:  # fetched along with a neighbour for this very lookup
                        self._ahead.discard(key)
                        self._stats.misses += 1
                    else:
                        self._stats.hits += 1
                    self._touch(key)
                    return False
                waiting = self._fetching.get(key)
                if waiting is None and self._written_elsewhere(key):
                    continue
                if waiting is None:
                    if self.offline:
                        raise ExpertPagerError(self._missing_message([key]))
                    near = {k for batch in self._announced for k in batch
                            if k not in self._present and k not in self._fetching} - {key}
                    group = next(g for g in self._groups([key, *sorted(near)]) if key in g)
                    group = [key, *(k for k in group if k != key)]
                    self._claim(group)
                    self._stats.misses += 1
                    break
            waiting.wait()
        self._fetch(group)
        return True

    def fetch_many(self, keys: Iterable[SliceKey], threads: int = 4, advance=lambda: None) -> int:
        """Fetch the slices of `keys` not yet present, neighbours on the remote in one request each (see _groups),
        `threads` requests at a time; `advance()` once per key. Returns how many were fetched."""
        from concurrent.futures import ThreadPoolExecutor

        keys = list(dict.fromkeys(keys))
        with self._lock:
            todo = [k for k in keys if k not in self._present and k not in self._fetching]
            if todo and self.offline:
                raise ExpertPagerError(self._missing_message(todo))
            groups = self._groups(todo)
            for group in groups:
                self._claim(group)
            self._stats.misses += len(todo)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for group in pool.map(lambda g: self._fetch(g, len(g)), groups):
                for _ in group:
                    advance()
        fetched = set(todo)
        for key in (k for k in keys if k not in fetched):  # present already, or being fetched by another thread
            self.ensure(key)
            advance()
        return len(todo)

    def _groups(self, keys: list[SliceKey]) -> list[list[SliceKey]]:
        """Under the lock: `keys` split into groups to fetch together: slices whose remote ranges coalesce into shared
        requests (http.coalesce), in remote order, at most MAX_REQUEST bytes a group."""
        root = {k: k for k in keys}

        def find(k: SliceKey) -> SliceKey:
            while root[k] != k:
                root[k] = root[root[k]]
                k = root[k]
            return k

        runs = sorted((f.url, start, end, key) for key in keys for f, start, end, _ in self._sources[key].runs)
        for (url0, _, end0, key0), (url, start, _, key) in zip(runs, runs[1:]):
            if url == url0 and start - end0 < COALESCE_GAP:
                root[find(key)] = find(key0)
        first = {}
        for url, start, _, key in runs:
            first.setdefault(key, (url, start))
        members: dict[SliceKey, list[SliceKey]] = {}
        for key in sorted(keys, key=first.__getitem__):
            members.setdefault(find(key), []).append(key)
        groups = []
        for same in members.values():
            size = MAX_REQUEST
            for key in same:
                if size + self._sources[key].size > MAX_REQUEST:
                    groups.append([])
                    size = 0
                groups[-1].append(key)
                size += self._sources[key].size
        return groups

    def _written_elsewhere(self, key: SliceKey) -> bool:
        """Under the lock: whether another process sharing the store has written the slice; if so it is present."""
        try:
            size = os.stat(self.slice_path(key)).st_size
        except FileNotFoundError:
            return False
        if size != self._sources[key].size:
            return False
        self._present[key] = size
        return True

    def _touch(self, key: SliceKey) -> None:
        """Record the use in the file's mtime, so a later run evicts in the same order."""
        try:
            os.utime(self.slice_path(key))
        except FileNotFoundError:
            pass

    def _claim(self, keys: list[SliceKey]) -> None:
        """Under the lock: mark `keys` as being fetched by this thread (other lookups wait for them)."""
        for key in keys:
            self._fetching[key] = threading.Event()

    def _release(self, key: SliceKey) -> None:
        with self._lock:
            waiting = self._fetching.pop(key, None)
        if waiting is not None:
            waiting.set()

    def _fetch(self, keys: list[SliceKey], asked: int = 1) -> list[SliceKey]:
        """Fetch the claimed `keys` in as few range requests as their remote bytes allow, verify each slice, make room
        and write it atomically, releasing each as it lands. The first `asked` keys are the ones looked up: a failure
        of one of them is raised; a neighbour fetched along that fails is left out, for its own lookup to retry."""
        error = None
        try:
            for i, (key, image) in enumerate(self._download(keys)):
                try:
                    self._verify(key, image)
                    self._write(key, image)
                    if i >= asked:
                        with self._lock:
                            self._ahead.add(key)
                except ExpertPagerError as e:
                    error = error or (e if i < asked else None)
                finally:
                    self._release(key)
        finally:
            for key in keys:
                self._release(key)
        if error is not None:
            raise error
        return keys

    def _download(self, keys: list[SliceKey]) -> Iterator[tuple[SliceKey, bytearray]]:
        """(key, its file's image) for each of `keys` in order, from one range request per coalesced span."""
        images = {k: bytearray(self._sources[k].size) for k in keys}
        by_url: dict[str, list[tuple[RemoteFile, int, int, SliceKey, int]]] = {}
        for key in keys:
            for f, start, end, at in self._sources[key].runs:
                by_url.setdefault(f.url, []).append((f, start, end, key, at))
        for runs in by_url.values():
            f = runs[0][0]
            spans = coalesce((start, end) for _, start, end, _, _ in runs)
            starts = [s for s, _ in spans]
            inside: list[list] = [[] for _ in spans]
            for run in runs:
                inside[bisect_right(starts, run[1]) - 1].append(run)
            for (span_start, span_end), span_runs in zip(spans, inside):
                data = self.client.read(f.url, span_start, span_end - span_start, self.model.headers, f.etag)
                for _, start, end, key, at in span_runs:
                    images[key][at: at + end - start] = data[start - span_start: end - span_start]
        for key in keys:
            yield key, images.pop(key)

    def _verify(self, key: SliceKey, image: bytearray) -> None:
        """A repacked checkpoint's slice against its manifest's SHA-256."""
        src = self._sources[key]
        if src.sha256 is None:
            return
        local = {p.role: p for p in self.layout.slices[key].parts}
        parts = sorted(self.remote_layout.slices[key].parts, key=lambda p: (p.file, p.offset))
        if slice_digest(image[local[p.role].offset: local[p.role].offset + p.length] for p in parts) != src.sha256:
            raise ExpertPagerError(f"{src.runs[0][0].url}: expert slice {key} (layer, expert) arrived with the wrong "
                                   "SHA-256 (the manifest disagrees); it was not stored")

    def _write(self, key: SliceKey, image: bytearray) -> None:
        """Make room for the slice and write its file atomically, under the folder's lock (so the budget holds for
        every process and thread sharing the store)."""
        size = self._sources[key].size
        with store_locked(self.folder) as fd:
            with self._lock:
                self._refresh(fd)
                self._make_room(size, key, fd)
            write_atomic(self.slice_path(key), size, lambda out: pwrite_all(out, image, 0))
            with self._lock:
                self._present[key] = size
                self._generation = bump(fd)

    def _make_room(self, size: int, key: SliceKey | None, fd: int) -> None:
        """Under both locks (lock fd): delete least recently used slices not held (here or by another process) until
        `size` more bytes fit the budget."""
        if self.disk is None:
            return
        victims = iter([k for k in self._present if k not in self._held and k not in self._fetching])
        while self.used_bytes + size > self.disk:
            victim = next(victims, None)
            if victim is None:
                raise ExpertPagerError(f"{self.folder}: the disk budget of {self.disk:,} bytes is too small for slice "
                                       f"{key}: {self.used_bytes:,} bytes are resident tensors, headers and slices "
                                       "in use; raise --disk")
            if not delete_unless_held(self.slice_path(victim)):
                continue
            del self._present[victim]
            self._ahead.discard(victim)
            self._stats.evictions += 1
            self._generation = bump(fd)

    def _check_budget(self, extra: int) -> None:
        if self.disk is not None and self._fixed + extra > self.disk:
            raise ExpertPagerError(f"{self.folder}: the disk budget of {self.disk:,} bytes is smaller than the "
                                   f"headers and resident tensors ({self._fixed + extra:,} bytes); raise --disk")

    def _missing_message(self, keys: list[SliceKey]) -> str:
        n = len(self._sources) - len(self._present)
        return (f"{self.model.ref}: offline, and expert slice {keys[0]} (layer, expert) is not in the store "
                f"{self.folder} ({len(self._present)} of {len(self._sources)} slices are; {n} missing); "
                f"fetch them online first with: expertpager pull {self.model.ref}")

    def measure_network(self, sample_bytes: int = 32 << 20, threads: int = 4) -> tuple[float, float]:
        """(bytes/s of slice-sized range reads, `threads` at a time; seconds of one 1-byte read, the median of 3),
        measured against the remote on up to `sample_bytes` of slices; nothing is stored."""
        from concurrent.futures import ThreadPoolExecutor

        keys = sorted(self._sources)
        runs = [r for k in keys[:: max(1, len(keys) * self.layout.slice_bytes // sample_bytes)] for r in self._sources[k].runs]
        first = runs[0][0]
        pings = []
        for _ in range(3):
            t0 = time.perf_counter()
            self.client.read(first.url, 0, 1, self.model.headers)
            pings.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            got = sum(pool.map(lambda r: len(self.client.read(r[0].url, r[1], r[2] - r[1], self.model.headers)), runs))
        return got / (time.perf_counter() - t0), sorted(pings)[1]

    # -- whole files -------------------------------------------------------------------------------------------

    def verify_files(self, progress: bool = False) -> list[str]:
        """Check each weight file the store holds every byte of (header, resident tensors, all its slices) against
        the SHA-256 the server publishes for it, unless store.json records it verified; record each match. Returns
        the files verified now. A mismatch drops the file's slices (and marks the resident tensors for fetching again,
        since the bad bytes may be theirs); after every file is checked, an error names the files that disagreed."""
        from ..progress import progress_bar

        meta = self._meta()
        if not meta.get("resident"):
            return []
        done, bad = [], []
        for name in self.model.weights:
            f = self.model.files[name]
            pieces = self._pieces(name) if f.sha256 and meta.get("verified", {}).get(name) != f.sha256 else None
            if pieces is None:
                continue
            with progress_bar(f"checking {name} against its SHA-256 ({f.size / 2**20:.0f} MiB)", max(f.size >> 20, 1),
                              progress and f.size >= 64 << 20) as advance:
                try:
                    got = file_sha256(f.size, pieces, lambda at, n: self.client.read(f.url, at, n, self.model.headers,
                                                                                     f.etag), lambda n: advance(n / 2**20))
                except FileNotFoundError:  # another process evicted a slice meanwhile: not whole any more
                    continue
            if got != f.sha256:
                bad.append(f"{f.url}: the file's SHA-256 is {got}, but the server publishes {f.sha256}; its "
                           f"{self._drop_file(name)} expert slices were dropped from the store {self.folder} and will be "
                           "fetched again, and the resident tensors at the next load")
                continue
            with store_locked(self.folder):
                meta = self._meta()
                self._write_meta({**meta, "verified": {**meta.get("verified", {}), name: got}})
            done.append(name)
        if bad:
            raise ExpertPagerError("; ".join(bad))
        return done

    def _pieces(self, name: str) -> list[Piece] | None:
        """Where the store holds weight file `name`'s bytes: its skeleton's header and resident tensors, its slices'
        runs in their files; None when one of its slices is missing."""
        path = self.folder / name
        pieces = [(0, header_end(path), path, 0)]
        pieces += [(t.offset, t.offset + t.length, path, t.offset) for t in self.remote_layout.resident
                   if t.file == str(path)]
        with self._lock:
            for key, src in self._sources.items():
                runs = [(start, end, self.slice_path(key), at) for f, start, end, at in src.runs if f.name == name]
                if runs and key not in self._present:
                    return None
                pieces += runs
        return pieces

    def _drop_file(self, name: str) -> int:
        """Delete the slices with bytes in weight file `name` (but those being read), forget the resident tensors
        were fetched; returns how many slices went."""
        keys = [k for k, src in self._sources.items() if any(f.name == name for f, *_ in src.runs)]
        dropped = 0
        with store_locked(self.folder) as fd:
            with self._lock:
                self._refresh(fd)
                for key in keys:
                    if key in self._present and key not in self._held and delete_unless_held(self.slice_path(key)):
                        del self._present[key]
                        self._ahead.discard(key)
                        dropped += 1
                self._generation = bump(fd)
            self._write_meta({**self._meta(), "resident": False})
        return dropped

    # -- resident tensors ----------------------------------------------------------------------------------------

    def fetch_resident(self, progress: bool = False) -> None:
        """Fetch the resident tensors into the skeleton once (marked done in store.json only after fsync)."""
        meta = self._meta()
        if meta.get("resident"):
            return
        if self.offline:
            raise ExpertPagerError(f"{self.model.ref}: offline, and the store {self.folder} does not hold the resident "
                                   f"tensors yet; run `expertpager pull {self.model.ref}` online first")
        from ..progress import progress_bar

        by_file: dict[str, list[tuple[int, int]]] = {}
        for t in self.remote_layout.resident:
            by_file.setdefault(t.file, []).append((t.offset, t.offset + t.length))
        total = sum(e - s for r in by_file.values() for s, e in r)
        self._check_budget(total)
        with progress_bar(f"fetching resident tensors ({total / 2**20:.0f} MiB)", max(total >> 20, 1), progress) as advance:
            for path, ranges in by_file.items():
                name = Path(path).relative_to(self.folder).as_posix()
                fetch_ranges(Path(path), self.model.files[name], ranges, self.model, self.client,
                             lambda n: advance(n / 2**20))
        self._fixed = skeleton_bytes(self.folder, self.model)
        with store_locked(self.folder):
            self._write_meta({**self._meta(), "resident": True})

    def _meta(self) -> dict:
        return json.loads((self.folder / STORE_FILE).read_text())

    def _write_meta(self, meta: dict) -> None:
        raw = json.dumps(meta, indent=1).encode()
        write_atomic(self.folder / STORE_FILE, len(raw), lambda fd: pwrite_all(fd, raw, 0))

