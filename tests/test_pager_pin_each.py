"""SliceCache.pin_each: slices handed out as each becomes ready, prefetches queued with a pin, pins released."""

import threading

import pytest
from pager_helpers import Gate, check_buffer, write_model

from expertpager.errors import ExpertPagerError
from expertpager.pager import SliceCache, plan_reads


def _all_free(cache: SliceCache, slices) -> None:
    """Every slot can be pinned again: nothing was left pinned."""
    keys = list(slices)[: cache.num_slots]
    cache.pin_many(keys).release()


def test_resident_slices_come_out_while_a_load_is_still_reading(tmp_path):
    slices, contents = write_model(tmp_path)
    hit, slow, other = (0, 0), (0, 1), (1, 0)
    gate = Gate(slow)
    with SliceCache(slices, budget=10**6, threads=2, verify=gate) as cache:
        cache.pin(hit).release()
        order = []
        with cache.pin_each([slow, hit, other]) as stream:
            for key, buf in stream:
                check_buffer(buf, slices[key], contents)
                order.append(key)
                if key == hit:  # a worker is reading the slow slice (the caller, busy here, cannot be)
                    assert gate.entered.wait(20)
                if key == other:  # the slow load is still held at its verify hook: let it finish
                    assert gate.entered.is_set() and slow not in order
                    gate.open.set()
            assert set(stream.pinned) == {hit, slow, other}
        assert order == [hit, other, slow]
        s = cache.stats
        assert (s.hits, s.misses) == (1, 3)
        _all_free(cache, slices)


def test_prefetch_given_with_a_pin_never_evicts_the_pinned_slices(tmp_path):
    slices, _ = write_model(tmp_path)
    keys = list(slices)
    need = max(plan_reads(s).slot_bytes for s in slices.values())
    with SliceCache(slices, budget=3 * need, threads=2, policy="lru") as cache:
        assert cache.num_slots == 3
        with cache.pin_many(keys[:2], prefetch=keys[2:6]) as bufs:
            assert set(bufs) == set(keys[:2])
            for _ in range(200):
                assert set(keys[:2]) <= set(cache.resident())
        s = cache.stats
        assert s.misses == 2 and s.prefetch_issued >= 1


def test_a_failed_load_raises_after_the_others_and_releases_every_pin(tmp_path):
    slices, contents = write_model(tmp_path)
    bad = (1, 1)

    def verify(key, views):
        if key == bad:
            raise ExpertPagerError(f"checksum mismatch in slice {key}")

    need = max(plan_reads(s).slot_bytes for s in slices.values())
    with SliceCache(slices, budget=3 * need, threads=1, verify=verify, wait_timeout=5) as cache:
        got = []
        with pytest.raises(ExpertPagerError, match="checksum mismatch in slice"):
            with cache.pin_each([(0, 0), bad, (0, 1)]) as stream:
                for key, buf in stream:
                    check_buffer(buf, slices[key], contents)
                    got.append(key)
        assert bad not in got and bad not in cache.resident()
        _all_free(cache, slices)


def test_leaving_early_releases_slices_still_loading(tmp_path):
    slices, _ = write_model(tmp_path)
    slow = (1, 2)
    gate = Gate(slow)
    need = max(plan_reads(s).slot_bytes for s in slices.values())
    with SliceCache(slices, budget=3 * need, threads=2, verify=gate, wait_timeout=5) as cache:
        cache.pin((0, 0)).release()
        stream = cache.pin_each([(0, 0), slow])
        with stream:
            first = next(iter(stream))
            assert first[0] == (0, 0)
            threading.Timer(0.05, gate.open.set).start()
        assert stream.pinned == {}
        _all_free(cache, slices)


def test_no_workers_the_caller_reads_everything(tmp_path):
    slices, contents = write_model(tmp_path)
    with SliceCache(slices, budget=10**6, threads=0) as cache:
        keys = list(slices)[:4]
        with cache.pin_each(keys) as stream:
            seen = {key: check_buffer(buf, slices[key], contents) for key, buf in stream}
        assert set(seen) == set(keys)
        assert cache.stats.misses == 4
