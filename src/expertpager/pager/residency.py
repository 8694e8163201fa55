"""Which slice holds which slot: the bookkeeping that the live cache and trace replay share.

A fixed set of slots (sizes from `plan_slots`); a key goes into the smallest free slot that fits it, else into
the slot of the victim the policy picks among keys whose slot fits and that the caller lets go.
"""

from collections.abc import Callable, Mapping, Sequence

from ..model.layout import SliceKey
from .policies import Policy


class Residency:
    """Slot assignment under a policy. Not thread-safe: the cache calls it under its lock."""

    def __init__(self, needs: Mapping[SliceKey, int], slot_sizes: Sequence[int], policy: Policy):
        self.needs = needs
        self.slot_sizes = list(slot_sizes)
        self.policy = policy
        self.slot_of: dict[SliceKey, int] = {}
        self.free: dict[int, list[int]] = {}
        for i in reversed(range(len(self.slot_sizes))):
            self.free.setdefault(self.slot_sizes[i], []).append(i)
        self.classes = sorted(self.free)
        policy.start(needs.keys())

    def place(self, key: SliceKey, evictable: Callable[[SliceKey], bool]) -> tuple[int, SliceKey | None] | None:
        """Give `key` a slot: (slot, evicted key or None), or None if every fitting slot is held."""
        need = self.needs[key]
        for size in self.classes:
            if size >= need and self.free[size]:
                return self._assign(key, self.free[size].pop()), None
        sizes, slot_of = self.slot_sizes, self.slot_of
        victim = self.policy.victim(lambda k: sizes[slot_of[k]] >= need and evictable(k))
        if victim is None:
            return None
        slot = self.slot_of.pop(victim)
        self.policy.remove(victim)
        return self._assign(key, slot), victim

    def _assign(self, key: SliceKey, slot: int) -> int:
        self.slot_of[key] = slot
        self.policy.admit(key)
        return slot

    def remove(self, key: SliceKey) -> int:
        """Take `key` out (a failed or abandoned load); its slot becomes free."""
        slot = self.slot_of.pop(key)
        self.policy.remove(key)
        self.free[self.slot_sizes[slot]].append(slot)
        return slot
