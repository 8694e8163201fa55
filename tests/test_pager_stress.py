"""Many threads, a tiny budget, random pins, pin_many, prefetches and cancels: invariants hold throughout."""

import random
import threading
import zlib

import pytest
from pager_helpers import write_model

from expertpager.errors import ExpertPagerError
from expertpager.pager import SliceCache, plan_reads


def _crcs(buf, sl):
    return tuple(zlib.crc32(buf.views[p.role]) for p in sl.parts)


@pytest.mark.parametrize("policy,faults", [("lru", False), ("cycle", False), ("lfu", True)])
def test_stress_random_pins_and_prefetches(tmp_path, policy, faults):
    slices, contents = write_model(tmp_path, layers=4, experts=6, size=2500)
    truth = {k: tuple(zlib.crc32(contents[p.file][p.offset : p.offset + p.length]) for p in s.parts) for k, s in slices.items()}
    keys = list(slices)
    budget = 5 * max(plan_reads(s).slot_bytes for s in slices.values())
    failures: list[str] = []
    fault_rng = random.Random(99)
    injecting = [faults]  # off for the final pins, which must not meet an injected fault

    def verify(key, views):
        if injecting[0] and fault_rng.random() < 0.05:
            raise ExpertPagerError(f"injected fault in {key}")

    with SliceCache(slices, budget=budget, policy=policy, threads=3, wait_timeout=30, verify=verify) as cache:
        assert cache.pool_bytes <= budget

        def check(buf, key, when):
            if buf.key != key or _crcs(buf, slices[key]) != truth[key]:
                failures.append(f"{key} wrong bytes {when}")
            if key not in cache.resident():
                failures.append(f"{key} not resident while pinned")

        def worker(seed):
            rng = random.Random(seed)
            for _ in range(300):
                try:
                    op = rng.random()
                    if op < 0.45:
                        key = rng.choice(keys)
                        with cache.pin(key) as buf:
                            check(buf, key, "on pin")
                            for _ in range(rng.randint(0, 3)):
                                cache.prefetch(rng.sample(keys, 2))
                            check(buf, key, "after others ran")
                    elif op < 0.7:
                        many = rng.sample(keys, 2)
                        with cache.pin_many(many) as bufs:
                            for key, buf in bufs.items():
                                check(buf, key, "in pin_many")
                    elif op < 0.95:
                        cache.prefetch(rng.sample(keys, rng.randint(1, 4)))
                    else:
                        cache.cancel_prefetches(rng.sample(keys, 3) if rng.random() < 0.5 else None)
                except ExpertPagerError as e:
                    if not (faults and "injected" in str(e)):
                        failures.append(repr(e))
                except Exception as e:  # noqa: BLE001 - collected and reported by the main thread
                    failures.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = cache.stats
        assert not failures, failures[:5]
        assert (s.load_errors > 0) == faults
        assert s.pins > 0 and s.evictions > 0
        # white-box invariants of the bookkeeping once everything is released
        slots = cache._book.slot_of
        assert set(slots) == set(cache._ready) | set(cache._loading)
        assert len(set(slots.values())) == len(slots)
        assert all(slot.pins == 0 for slot in cache._slots)
        assert all(cache._slots[i].key == k for k, i in slots.items())
        injecting[0] = False
        for key in keys[:3]:
            with cache.pin(key) as buf:
                check(buf, key, "at the end")
        assert not failures
