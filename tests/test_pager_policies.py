"""Eviction policies on hand traces, Belady as the bound, and replay agreeing with the live cache."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pager_helpers import write_model

from expertpager.errors import ExpertPagerError
from expertpager.pager import Belady, SliceCache, make_policy, replay
from expertpager.pager.residency import Residency

SLOT = 4096


def _resident_after(trace, slots, policy, steps=None):
    """Run the first `steps` accesses of a trace through the shared bookkeeping; return what is resident."""
    pol = make_policy(policy, trace)
    book = Residency(dict.fromkeys(trace, SLOT), [SLOT] * slots, pol)
    for key in trace[:steps]:
        if key not in book.slot_of:
            book.place(key, lambda k: True)
        pol.touch(key)
    return set(book.slot_of)


A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def test_lru_and_belady_known_answers():
    trace = [A, B, C, A, D, B]
    lru = replay(trace, SLOT, 3 * SLOT, "lru")
    assert (lru.hits, lru.misses) == (1, 5)  # D evicts B, then B evicts C
    opt = replay(trace, SLOT, 3 * SLOT, "belady")
    assert (opt.hits, opt.misses) == (2, 4)  # D evicts C, never used again
    assert _resident_after(trace, 3, "lru", 5) == {A, C, D}
    assert _resident_after(trace, 3, "belady", 5) == {A, B, D}


def test_lru_fails_a_cycle_one_larger_than_the_cache():
    trace = [A, B, C, D] * 5
    assert replay(trace, SLOT, 3 * SLOT, "lru").hits == 0
    assert replay(trace, SLOT, 3 * SLOT, "belady").hits == 11


def test_lfu_evicts_the_least_used_then_ages():
    assert _resident_after([A, A, B, C, D], 3, "lfu") == {A, C, D}  # B and C used once, B older
    # with aging, a once-hot key does not stay forever: after A leaves, L rises to A's count
    trace = [A, A, A, B, C, D, B, C, D, B, C, D]
    assert A in _resident_after(trace, 3, "lfu", 6)
    assert A not in _resident_after(trace, 3, "lfu")


def test_belady_needs_a_trace_and_unknown_policy_errors():
    with pytest.raises(ExpertPagerError, match="trace"):
        make_policy("belady")
    with pytest.raises(ExpertPagerError, match="unknown cache policy"):
        make_policy("fifo")
    assert isinstance(make_policy(Belady([A])), Belady)


@settings(max_examples=60, deadline=None)
@given(
    trace=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=120),
    slots=st.integers(1, 8),
)
def test_belady_is_a_lower_bound_on_misses(trace, slots):
    best = replay(trace, SLOT, slots * SLOT, "belady").misses
    for name in ("lru", "lfu", "cycle"):
        assert best <= replay(trace, SLOT, slots * SLOT, name).misses, name


def _fewest_misses(trace, slots):
    """Exhaustive search over every eviction choice: the true optimum for tiny traces."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def go(i, resident):
        if i == len(trace):
            return 0
        key = trace[i]
        if key in resident:
            return go(i + 1, resident)
        if len(resident) < slots:
            return 1 + go(i + 1, resident | {key})
        return 1 + min(go(i + 1, (resident - {out}) | {key}) for out in resident)

    return go(0, frozenset())


@settings(max_examples=40, deadline=None)
@given(
    trace=st.lists(st.tuples(st.just(0), st.integers(0, 4)), min_size=1, max_size=14),
    slots=st.integers(1, 3),
)
def test_belady_is_optimal_on_tiny_traces(trace, slots):
    assert replay(trace, SLOT, slots * SLOT, "belady").misses == _fewest_misses(tuple(trace), slots)


def moe_trace(layers=8, experts=32, k=4, tokens=300, seed=0):
    """A routing trace with skewed, layer-specific expert popularity, visited layer by layer per token."""
    rng = np.random.default_rng(seed)
    trace = []
    weights = [rng.permutation(1.0 / np.arange(1, experts + 1) ** 1.1) for _ in range(layers)]
    for _ in range(tokens):
        for layer in range(layers):
            p = weights[layer] / weights[layer].sum()
            for e in rng.choice(experts, size=k, replace=False, p=p):
                trace.append((layer, int(e)))
    return trace


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_cycle_policy_beats_lru_on_moe_routing(fraction):
    trace = moe_trace()
    budget = int(8 * 32 * fraction) * SLOT
    hits = {name: replay(trace, SLOT, budget, name).hits for name in ("lru", "lfu", "cycle", "belady")}
    assert hits["cycle"] > hits["lru"]
    assert hits["belady"] >= max(hits.values())


def test_cycle_keeps_a_prefetch_until_its_turn_then_drops_it_first():
    pol = make_policy("cycle")
    keys = [(l, e) for l in (0, 1) for e in range(4)]
    pol.start(keys)
    for key in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # token 0
        pol.admit(key)
        pol.touch(key)
    pol.touch((0, 0))  # token 1, layer 0
    pol.admit((1, 3))  # prefetched for layer 1, never used before
    assert pol.victim(lambda k: True) != (1, 3)
    assert pol.victim(lambda k: k[0] == 1) != (1, 3)  # not even against slices used a token ago
    pol.touch((1, 0))  # layer 1's turn passes without it
    pol.touch((0, 0))  # token 2
    assert pol.victim(lambda k: True) == (1, 3)


def test_replay_matches_the_live_cache(tmp_path):
    """The same slot plan, bookkeeping and policy code: replay and SliceCache count the same hits and misses."""
    slices, _ = write_model(tmp_path, layers=3, experts=6)
    rng = np.random.default_rng(1)
    keys = list(slices)
    trace = [keys[i] for i in rng.integers(0, len(keys), 300)]
    budget = 120_000  # a few slots of mixed sizes
    for name in ("lru", "lfu", "cycle", "belady"):
        expected = replay(trace, slices, budget, name)
        policy = Belady(trace) if name == "belady" else name
        with SliceCache(slices, budget=budget, policy=policy, threads=0) as cache:
            assert cache.num_slots == expected.num_slots
            for key in trace:
                with cache.pin(key):
                    pass
            s = cache.stats
        assert (s.hits, s.misses, s.bytes_read) == (expected.hits, expected.misses, expected.bytes_read), name
        assert 0 < s.hits < len(trace)


def test_replay_budget_error():
    with pytest.raises(ExpertPagerError, match="bytes needed"):
        replay([A, B], 10_000, 5_000)
