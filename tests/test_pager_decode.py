"""SliceCache with a decode step: slots hold the decoded slice, raw bytes pass through counted staging buffers."""

import numpy as np
import pytest
from pager_helpers import expected, write_model

from expertpager.errors import ExpertPagerError
from expertpager.pager import Decoder, SliceCache, plan_reads, plan_slots, replay

ORDER = ("gate", "up", "down")


def doubling_decoder(slices, fail: set | None = None) -> Decoder:
    """Each part served twice over (decoded slices are twice the raw size), gate, up, down back to back."""
    views = {}
    for key, s in slices.items():
        pos, out = 0, []
        for role in ORDER:
            n = 2 * s.part(role).length
            out.append((role, pos, n))
            pos += n
        views[key] = tuple(out)

    def decode(key, raw, out):
        if fail and key in fail:
            raise ValueError(f"bad blocks in {key}")
        for role in ORDER:
            out[role][:] = np.concatenate([raw[role], raw[role]])

    return Decoder(views, decode)


def check_decoded(buf, sl, contents) -> None:
    for part in sl.parts:
        assert buf.views[part.role].tobytes() == 2 * expected(contents, part), (sl.key, part.role)


def test_slots_hold_decoded_slices_and_staging_is_in_the_budget(tmp_path):
    slices, contents = write_model(tmp_path)
    dec = doubling_decoder(slices)
    raw = max(plan_reads(s).slot_bytes for s in slices.values())
    decoded = max(dec.slot_bytes(k) for k in slices)
    budget = 3 * decoded + 2 * raw  # threads=1: one worker's and one caller's staging buffer
    with SliceCache(slices, budget=budget, threads=1, decode=dec) as cache:
        assert cache.staging_bytes == 2 * raw and cache.pool_bytes <= budget
        assert cache.num_slots == len(plan_slots([dec.slot_bytes(k) for k in slices], budget, 1, 2 * raw))
        trace = [k for k in slices for _ in range(2)] + list(slices)
        for key in trace:
            with cache.pin(key) as buf:
                check_decoded(buf, slices[key], contents)
        s = cache.stats
        with cache.pin_many(list(slices)[:3]) as bufs:
            for key, buf in bufs.items():
                check_decoded(buf, slices[key], contents)
    replayed = replay(trace, {k: dec.slot_bytes(k) for k in slices}, budget - 2 * raw)
    assert (s.hits, s.misses) == (replayed.hits, replayed.misses)
    with pytest.raises(ExpertPagerError, match="staging buffers"):
        SliceCache(slices, budget=decoded + raw, threads=1, decode=dec)


def test_verify_sees_raw_bytes_and_decode_errors_are_never_served(tmp_path):
    slices, contents = write_model(tmp_path)
    bad = (1, 2)
    seen = []

    def verify(key, views):
        for part in slices[key].parts:
            assert views[part.role].tobytes() == expected(contents, part)
        seen.append(key)

    dec = doubling_decoder(slices, fail={bad})
    budget = 2 * max(dec.slot_bytes(k) for k in slices) + 3 * max(plan_reads(s).slot_bytes for s in slices.values())
    with SliceCache(slices, budget=budget, threads=2, wait_timeout=5, verify=verify, decode=dec) as cache:
        assert cache.num_slots == 2
        for _ in range(2):
            with pytest.raises(ExpertPagerError, match=r"decoding expert slice \(1, 2\) failed: .*bad blocks"):
                cache.pin(bad)
        with pytest.raises(ExpertPagerError, match="bad blocks"):
            cache.pin_many([(0, 0), bad])
        assert bad not in cache.resident()
        with cache.pin_many([(0, 1), (0, 2)]) as bufs:  # both slots came back
            for key, buf in bufs.items():
                check_decoded(buf, slices[key], contents)
        assert cache.stats.load_errors == 3
    assert seen.count(bad) == 3
