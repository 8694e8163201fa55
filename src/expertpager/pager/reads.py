"""Where a slice's bytes go in its slot: file ranges widened to 4 KiB blocks, coalesced, laid out back to back.

A part's slot offset is congruent to its file offset modulo 4096, so parts adjacent in the file stay
adjacent in the slot (a fused gate_up is one zero-copy view) and direct I/O can read straight into the slot.
"""

from dataclasses import dataclass

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice

BLOCK = 4096


@dataclass(frozen=True)
class Run:
    """One read: file bytes [start, start+length) (block-aligned) go to slot offset `slot_offset`.

    need_start/need_end bound the bytes the slice actually uses; buffered reads fetch only those.
    """

    file: str
    start: int
    length: int
    slot_offset: int
    need_start: int
    need_end: int


@dataclass(frozen=True)
class ReadPlan:
    """The reads of one slice and where each part's bytes sit in the slot."""

    runs: tuple[Run, ...]
    views: tuple[tuple[str, int, int], ...]  # (role, slot offset, length)
    slot_bytes: int  # room the slot needs: the sum of the widened runs


def _down(n: int) -> int:
    return n - n % BLOCK


def _up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def plan_reads(sl: ExpertSlice) -> ReadPlan:
    """Coalesce the slice's parts into block-aligned runs (merging runs whose blocks touch or overlap)."""
    if not sl.parts:
        raise ExpertPagerError(f"expert slice {sl.key} has no tensor parts")
    groups: list[list] = []  # [file, start, end, need_start, need_end, parts]
    for p in sorted(sl.parts, key=lambda p: (p.file, p.offset)):
        start, end = _down(p.offset), _up(p.offset + p.length)
        last = groups[-1] if groups else None
        if last is not None and last[0] == p.file and start <= last[2]:
            last[2] = max(last[2], end)
            last[4] = max(last[4], p.offset + p.length)
            last[5].append(p)
        else:
            groups.append([p.file, start, end, p.offset, p.offset + p.length, [p]])
    runs, views, pos = [], [], 0
    for file, start, end, need_start, need_end, parts in groups:
        runs.append(Run(file, start, end - start, pos, need_start, need_end))
        views.extend((p.role, pos + p.offset - start, p.length) for p in parts)
        pos += end - start
    return ReadPlan(tuple(runs), tuple(views), pos)
