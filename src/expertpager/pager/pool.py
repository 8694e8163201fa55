"""The slot pool: one anonymous mmap, allocated and touched once, cut into slots by size class."""

import mmap
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..errors import ExpertPagerError
from .reads import BLOCK


def size_classes(needs: Sequence[int]) -> list[int]:
    """Slot sizes, largest first: a need joins the next larger class if that wastes at most 1/16 of it."""
    classes: list[int] = []
    for n in sorted(set(needs), reverse=True):
        if not classes or n * 16 < classes[-1] * 15:
            classes.append(n)
    return classes


def class_of(need: int, classes: Sequence[int]) -> int:
    """The smallest class that holds `need` (classes are sorted largest first)."""
    return min(c for c in classes if c >= need)


def plan_slots(needs: Sequence[int], budget: int, min_pinned: int = 1, reserved: int = 0, pinned_with: int = 0) -> list[int]:
    """Slot sizes for a pool of at most `budget - reserved` bytes (`reserved`: staging buffers kept beside the slots):
    `min_pinned` slots of the largest class (even where fewer slices need that class: a smaller slice may sit in a
    large slot, and a layer's top-k must still be placeable at once), and `min_pinned` more of the class of
    `pinned_with` bytes when pieces that size are pinned beside each slice (an adapter's expert factors); the rest
    shared between classes in proportion to their bytes; no class gets more slots than it has slices beyond that."""
    classes = size_classes(needs)
    budget -= reserved
    demand = Counter(class_of(n, classes) for n in needs)
    if sum(c * k for c, k in demand.items()) <= budget:
        counts = dict(demand)
    else:
        largest = classes[0]
        counts = {c: 0 for c in classes}
        counts[largest] = min_pinned
        if pinned_with:
            counts[class_of(pinned_with, classes)] += min_pinned
        floor = sum(c * k for c, k in counts.items())
        if budget < floor:
            raise ExpertPagerError(
                f"budget of {budget + reserved} bytes cannot hold {min_pinned} slot(s) of the largest expert slice"
                + (f" and {min_pinned} of its adapter pieces" if pinned_with else "") + f": {floor + reserved} bytes "
                f"needed ({largest} bytes per slot" + (f", plus {reserved} bytes of staging buffers)" if reserved else ")")
            )
        rest = budget - floor
        total = sum(c * k for c, k in demand.items())
        for c in classes:
            counts[c] += max(0, min(demand[c] - counts[c], int(rest * c * demand[c] / total) // c))
        left = budget - sum(c * k for c, k in counts.items())
        for c in classes:
            extra = max(0, min(demand[c] - counts[c], left // c))
            counts[c] += extra
            left -= extra * c
    return [c for c in classes for _ in range(counts.get(c, 0))]


class SlotPool:
    """Page-aligned slots in one anonymous mapping; every page is written once here so page-in never faults."""

    def __init__(self, slot_sizes: Sequence[int]):
        if any(s % BLOCK for s in slot_sizes):
            raise ValueError("slot sizes must be multiples of the block size")
        self.sizes = list(slot_sizes)
        self.nbytes = sum(self.sizes)
        self._map = mmap.mmap(-1, max(self.nbytes, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.array[:: mmap.PAGESIZE] = 0
        self.offsets: list[int] = []
        pos = 0
        for s in self.sizes:
            self.offsets.append(pos)
            pos += s
        self.memory = memoryview(self._map)

    def slot(self, i: int) -> memoryview:
        """Slot i as a writable memoryview."""
        return self.memory[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    def close(self) -> None:
        """Unmap now unless a caller still holds a view, in which case the mapping lives until that is dropped."""
        self.memory.release()
        self.array = None
        try:
            self._map.close()
        except BufferError:
            pass
