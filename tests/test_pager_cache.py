"""SliceCache on real files: bytes, alignment, budget, pinning, prefetch, faults, stats, io modes."""

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
from pager_helpers import Gate, check_buffer, write_model

from expertpager.errors import ExpertPagerError
from expertpager.pager import SliceCache, plan_reads
from expertpager.pager import io as pager_io


def _need(slices) -> int:
    return max(plan_reads(s).slot_bytes for s in slices.values())


def _wait_for(predicate, what: str, limit: float = 20.0) -> None:
    """Wait for background work to reach a state (never asserts on how long it took, only that it happened)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.001)


def _dio_ok(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


@pytest.mark.parametrize("io", ["auto", "direct", "buffered+dontneed", "buffered"])
@pytest.mark.parametrize("fused", [False, True])
def test_views_are_the_file_bytes(tmp_path, io, fused):
    if io == "direct" and not _dio_ok(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    slices, contents = write_model(tmp_path, fused=fused)
    with SliceCache(slices, budget=10**7, io=io, threads=2) as cache:
        assert cache.pool_bytes <= 10**7
        for key, sl in slices.items():
            with cache.pin(key) as buf:
                check_buffer(buf, sl, contents)
                for part in sl.parts:
                    assert buf.views[part.role].ctypes.data % 4096 == part.offset % 4096
                if fused:
                    assert buf.views["up"].ctypes.data == buf.views["gate"].ctypes.data + sl.part("gate").length
        with cache.pin_many(list(slices)[:5]) as bufs:
            for key, buf in bufs.items():
                check_buffer(buf, slices[key], contents)


def test_auto_uses_direct_io_where_the_filesystem_allows(tmp_path):
    slices, _ = write_model(tmp_path)
    with SliceCache(slices, budget=10**6, io="auto", threads=0) as cache:
        expect = "direct" if _dio_ok(tmp_path) else "buffered+dontneed"
        assert set(cache.io_modes.values()) == {expect}


def test_tmpfs_works_in_auto_mode():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    folder = Path("/dev/shm") / f"expertpager-test-{os.getpid()}"
    folder.mkdir()
    try:
        expect = "direct" if _dio_ok(folder) else "buffered+dontneed"  # tmpfs has O_DIRECT since Linux 6.6
        slices, contents = write_model(folder)
        with SliceCache(slices, budget=10**6, io="auto", threads=1) as cache:
            assert set(cache.io_modes.values()) == {expect}
            for key in list(slices)[:3]:
                with cache.pin(key) as buf:
                    check_buffer(buf, slices[key], contents)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def _refuse_direct_open(path):
    raise OSError(errno.EINVAL, "Invalid argument")


def test_auto_falls_back_when_open_refuses_direct_io(tmp_path, monkeypatch):
    monkeypatch.setattr(pager_io, "_open_direct", _refuse_direct_open)
    slices, contents = write_model(tmp_path)
    with SliceCache(slices, budget=10**6, io="auto", threads=1) as cache:
        assert set(cache.io_modes.values()) == {"buffered+dontneed"}
        with cache.pin((1, 2)) as buf:
            check_buffer(buf, slices[(1, 2)], contents)
    with pytest.raises(ExpertPagerError, match="direct"):
        SliceCache(slices, budget=10**6, io="direct")


def test_auto_falls_back_when_direct_reads_are_refused(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT at open and answer EINVAL on read."""
    if not _dio_ok(tmp_path) or not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    real = os.preadv

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    slices, contents = write_model(tmp_path)
    with SliceCache(slices, budget=10**6, io="auto", threads=2) as cache:
        assert set(cache.io_modes.values()) == {"direct"}
        with cache.pin_many(list(slices)[:6]) as bufs:
            for key, buf in bufs.items():
                check_buffer(buf, slices[key], contents)
        assert set(cache.io_modes.values()) == {"buffered+dontneed"}
    with SliceCache(slices, budget=10**6, io="direct", threads=0) as cache:
        with pytest.raises(ExpertPagerError, match=r"model-0\.bin at offset"):
            cache.pin((0, 0))


def test_unknown_io_mode_and_missing_file(tmp_path):
    slices, _ = write_model(tmp_path)
    with pytest.raises(ExpertPagerError, match="io mode"):
        SliceCache(slices, budget=10**6, io="mmap")
    os.unlink(tmp_path / "model-1.bin")
    with pytest.raises(ExpertPagerError, match="model-1.bin"):
        SliceCache(slices, budget=10**6)


def test_budget_error_says_bytes_needed(tmp_path):
    slices, _ = write_model(tmp_path)
    need = _need(slices)
    with pytest.raises(ExpertPagerError, match=f"{2 * need} bytes needed"):
        SliceCache(slices, budget=2 * need - 1, min_pinned=2)
    with SliceCache(slices, budget=2 * need, min_pinned=2, threads=0) as cache:
        assert cache.pool_bytes <= 2 * need
        assert cache.num_slots >= 2


def test_pinned_slice_is_never_evicted(tmp_path):
    slices, contents = write_model(tmp_path, layers=1, experts=8)
    keys = list(slices)
    with SliceCache(slices, budget=2 * _need(slices), threads=0, wait_timeout=0.2) as cache:
        assert cache.num_slots == 2
        held = cache.pin(keys[0])
        for key in keys[1:] * 2:
            with cache.pin(key) as buf:
                check_buffer(buf, slices[key], contents)
            check_buffer(held, slices[keys[0]], contents)
        assert keys[0] in cache.resident()
        with cache.pin(keys[1]):
            with pytest.raises(ExpertPagerError, match="pinned"):
                cache.pin(keys[2])
        held.release()
        with pytest.raises(ExpertPagerError, match="released more often"):
            held.release()
        with pytest.raises(ExpertPagerError, match="3 slices at once"):
            cache.pin_many(keys[:3])


def test_stats_on_a_scripted_sequence(tmp_path):
    slices, _ = write_model(tmp_path, layers=2, experts=4)
    a, b, c = (0, 0), (0, 1), (1, 2)
    need = max(plan_reads(slices[k]).slot_bytes for k in (a, b, c))
    with SliceCache(slices, budget=2 * need, threads=0, policy="lru") as cache:
        for key in (a, a, b, c, b, a):  # miss hit miss miss(evicts a) hit miss(evicts c)
            with cache.pin(key):
                pass
        s = cache.stats_snapshot()
    assert (s.hits, s.misses, s.joins, s.evictions, s.load_errors) == (2, 4, 0, 2, 0)
    assert s.bytes_read == 2 * slices[a].nbytes + slices[b].nbytes + slices[c].nbytes
    assert s.hit_rate == pytest.approx(2 / 6)
    assert s.per_layer[0].hits == 2 and s.per_layer[0].misses == 3 and s.per_layer[1].misses == 1
    assert s.per_layer[1].evictions == 1 and s.per_layer[0].evictions == 1
    assert s.read_seconds > 0 and s.stall_seconds >= 0
    d = s.to_dict()
    assert d["pins"] == 6 and d["per_layer"][1]["misses"] == 1


def test_pin_joins_an_in_flight_prefetch(tmp_path):
    slices, contents = write_model(tmp_path)
    a = (0, 0)
    gate = Gate(a)
    with SliceCache(slices, budget=10**6, threads=1, verify=gate) as cache:
        cache.prefetch([a])
        assert gate.entered.wait(20)
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("buf", cache.pin(a)))
        t.start()
        _wait_for(lambda: cache.stats.joins == 1, "the pin joins the load")
        gate.open.set()
        t.join(20)
        check_buffer(got["buf"], slices[a], contents)
        got["buf"].release()
        s = cache.stats
        assert (s.joins, s.misses, s.prefetch_hits, s.prefetch_issued) == (1, 0, 1, 1)
        assert s.stall_seconds > 0


def test_completed_prefetch_is_a_hit(tmp_path):
    slices, contents = write_model(tmp_path)
    keys = list(slices)[:3]
    with SliceCache(slices, budget=10**6, threads=2) as cache:
        cache.prefetch(keys)
        _wait_for(lambda: set(keys) <= set(cache.resident()), "prefetches complete")
        for key in keys:
            with cache.pin(key) as buf:
                check_buffer(buf, slices[key], contents)
        s = cache.stats
        assert (s.hits, s.misses, s.prefetch_hits, s.prefetch_issued, s.bytes_read) == (
            3, 0, 3, 3, sum(slices[k].nbytes for k in keys))


def test_cancel_and_demand_overtakes_queued_prefetches(tmp_path):
    slices, contents = write_model(tmp_path)
    a, b, c, d, e = list(slices)[:5]
    gate = Gate(a)
    with SliceCache(slices, budget=10**6, threads=1, verify=gate) as cache:
        cache.prefetch([a, b, c, d])
        assert gate.entered.wait(20)  # the only worker is busy with a; b, c, d are queued
        with cache.pin(d) as buf:  # a demand load does not wait for the worker
            check_buffer(buf, slices[d], contents)
        with cache.pin(e) as buf:
            check_buffer(buf, slices[e], contents)
        assert cache.cancel_prefetches([b]) == 1
        assert cache.cancel_prefetches() == 1
        gate.open.set()
        _wait_for(lambda: a in cache.resident(), "the prefetch of a completes")
        s = cache.stats
        assert (s.misses, s.prefetch_cancelled, s.prefetch_issued) == (2, 3, 1)
        assert b not in cache.resident() and c not in cache.resident()


def test_prefetch_never_evicts_a_pinned_slice(tmp_path):
    slices, contents = write_model(tmp_path, layers=1, experts=6)
    k0, k1, k2, k3 = list(slices)[:4]
    with SliceCache(slices, budget=2 * _need(slices), threads=1) as cache:
        with cache.pin_many([k0, k1]) as bufs:
            cache.prefetch([k2])
            _wait_for(lambda: cache.stats.prefetch_dropped == 1, "the prefetch is dropped")
            for key, buf in bufs.items():
                check_buffer(buf, slices[key], contents)
        cache.prefetch([k2, k3])
        _wait_for(lambda: {k2, k3} <= set(cache.resident()), "prefetches fill the freed slots")
        cache.prefetch([k0])
        _wait_for(lambda: k0 in cache.resident(), "a prefetch evicts an unused prefetch")
        assert cache.stats.prefetch_wasted == 1


def test_truncated_file_gives_a_clear_error_and_recovers(tmp_path):
    slices, contents = write_model(tmp_path, layers=2, experts=4, files=2)
    path = str(tmp_path / "model-1.bin")
    victim = max((k for k, s in slices.items() if s.parts[0].file == path), key=lambda k: slices[k].parts[-1].offset)
    other = (0, 0)
    with SliceCache(slices, budget=10**6, threads=2, io="auto") as cache:
        os.truncate(path, slices[victim].parts[-1].offset + 10)
        for attempt in range(2):
            with pytest.raises(ExpertPagerError, match=r"model-1\.bin.*offset"):
                cache.pin(victim)
        with pytest.raises(ExpertPagerError, match=r"model-1\.bin"):
            cache.pin_many([other, victim])
        assert victim not in cache.resident()
        with cache.pin(other) as buf:
            check_buffer(buf, slices[other], contents)
        cache.prefetch([victim])
        _wait_for(lambda: cache.stats.load_errors == 4, "the prefetch fails too")
        with open(path, "r+b") as f:  # the same inode, so the open descriptor sees the repair
            f.write(contents[path])
        with cache.pin(victim) as buf:
            check_buffer(buf, slices[victim], contents)
        assert cache.stats.load_errors == 4


def test_verify_hook_sees_the_bytes_and_can_refuse(tmp_path):
    slices, contents = write_model(tmp_path)
    bad = (1, 1)
    seen = []

    def verify(key, views):
        for part in slices[key].parts:
            assert views[part.role].tobytes() == contents[part.file][part.offset : part.offset + part.length]
        seen.append(key)
        if key == bad:
            raise ExpertPagerError(f"checksum mismatch in slice {key}")

    with SliceCache(slices, budget=2 * _need(slices), threads=1, wait_timeout=5, verify=verify) as cache:
        with pytest.raises(ExpertPagerError, match="checksum"):
            cache.pin(bad)
        with pytest.raises(ExpertPagerError, match="checksum"):
            cache.pin_many([(0, 0), bad])
        with cache.pin_many([(0, 1), (0, 2)]) as bufs:  # both slots are free again
            assert len(bufs) == 2
        assert bad not in cache.resident()
    assert seen.count(bad) == 2


def test_verify_hook_other_exceptions_become_pager_errors(tmp_path):
    slices, _ = write_model(tmp_path)

    def verify(key, views):
        raise ValueError("boom")

    with SliceCache(slices, budget=10**6, threads=0, verify=verify) as cache:
        with pytest.raises(ExpertPagerError, match="boom"):
            cache.pin((0, 0))


def test_unknown_key_and_closed_cache(tmp_path):
    slices, _ = write_model(tmp_path)
    cache = SliceCache(slices, budget=10**6, threads=2)
    with pytest.raises(ExpertPagerError, match=r"\(9, 9\)"):
        cache.pin((9, 9))
    with pytest.raises(ExpertPagerError, match=r"\(9, 9\)"):
        cache.prefetch([(9, 9)])
    with cache.pin((0, 0)):
        pass
    cache.close()
    with pytest.raises(ExpertPagerError, match="closed"):
        cache.pin((0, 0))
    cache.close()


def test_adapter_pieces_share_slots_and_budget_and_count_apart(tmp_path):
    slices, contents = write_model(tmp_path, layers=2, experts=4, size=9000)
    (tmp_path / "pieces").mkdir()
    small, more = write_model(tmp_path / "pieces", layers=2, experts=4, size=500, seed=1)
    pieces = {(*k, "code"): s for k, s in small.items()}  # keyed (layer, expert, adapter)
    contents.update(more)
    big, piece = _need(slices), max(plan_reads(s).slot_bytes for s in pieces.values())
    with pytest.raises(ExpertPagerError, match="and 2 of its adapter pieces"):
        SliceCache({**slices, **pieces}, budget=2 * big + 2 * piece - 1, min_pinned=2)
    with SliceCache({**slices, **pieces}, budget=2 * big + 2 * piece, min_pinned=2, threads=0) as cache:
        assert sorted(cache.slot_sizes) == [piece, piece, big, big]
        for layer in (0, 1, 0):
            keys = [(layer, 0), (layer, 1), (layer, 0, "code"), (layer, 1, "code")]
            with cache.pin_many(keys) as pinned:
                for key in keys:
                    assert pinned[key].key == key
                    for p in {**slices, **pieces}[key].parts:
                        assert pinned[key].views[p.role].tobytes() == contents[p.file][p.offset:p.offset + p.length]
        s = cache.stats_snapshot()
    assert (s.misses, s.hits, s.evictions) == (6, 0, 4)  # expert slices only: 2 per pass, never held over
    assert (s.adapters.misses, s.adapters.evictions) == (6, 4) and s.adapters.bytes_read > 0
    assert s.bytes_read == sum(slices[(l, e)].nbytes for l in (0, 1, 0) for e in (0, 1))
    assert s.to_dict()["adapters"]["misses"] == 6
