"""Slot layout of a slice's reads and the slot plan under a budget."""

import pytest

from expertpager.errors import ExpertPagerError
from expertpager.model.layout import ExpertSlice, TensorPart
from expertpager.pager import plan_reads, plan_slots
from expertpager.pager.pool import SlotPool, size_classes


def _slice(*parts):
    return ExpertSlice(0, 0, tuple(TensorPart(r, f, o, n, "U8", (n,)) for r, f, o, n in parts))


def test_parts_keep_file_offset_modulo_block_and_adjacency():
    sl = _slice(("gate", "a", 1237, 5000), ("up", "a", 6237, 5000), ("down", "a", 900_001, 7000))
    plan = plan_reads(sl)
    assert len(plan.runs) == 2  # gate and up coalesce, down is far away
    views = {role: (off, n) for role, off, n in plan.views}
    for part in sl.parts:
        assert views[part.role][0] % 4096 == part.offset % 4096
    assert views["up"][0] == views["gate"][0] + 5000
    assert plan.slot_bytes % 4096 == 0
    assert plan.slot_bytes == sum(r.length for r in plan.runs)


def test_runs_in_different_files_and_touching_blocks():
    sl = _slice(("gate", "a", 100, 10), ("up", "a", 8200, 10), ("down", "b", 0, 4096))
    plan = plan_reads(sl)
    assert [(r.file, r.start, r.length) for r in plan.runs] == [("a", 0, 4096), ("a", 8192, 4096), ("b", 0, 4096)]
    sl2 = _slice(("gate", "a", 100, 10), ("up", "a", 4000, 200))  # up crosses into the next block
    assert [(r.start, r.length, r.need_start, r.need_end) for r in plan_reads(sl2).runs] == [(0, 8192, 100, 4200)]


def test_empty_slice_is_an_error():
    with pytest.raises(ExpertPagerError):
        plan_reads(ExpertSlice(1, 2, ()))


def test_size_classes_merge_close_sizes():
    assert size_classes([4096 * 16, 4096 * 15, 4096 * 8]) == [4096 * 16, 4096 * 8]


@pytest.mark.parametrize("budget", [40_960, 100_000, 300_000, 10**7])
def test_slot_plan_stays_within_budget(budget):
    needs = [16384] * 10 + [8192] * 20 + [4096] * 5
    sizes = plan_slots(needs, budget)
    assert sum(sizes) <= budget
    assert max(sizes) == 16384
    if budget >= sum(needs):
        assert sorted(sizes) == sorted(needs)


def test_budget_too_small_names_bytes_needed():
    with pytest.raises(ExpertPagerError, match="32768 bytes needed"):
        plan_slots([16384, 8192], 20000, min_pinned=2)


def test_pool_is_page_aligned():
    pool = SlotPool([8192, 4096, 8192])
    assert pool.nbytes == 20480
    for i in range(3):
        assert pool.array[pool.offsets[i] :].ctypes.data % 4096 == 0
    pool.close()


def test_pager_imports_no_ml_framework():
    import subprocess
    import sys

    code = "import sys, expertpager.pager; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
