"""An optional decode step at page-in: the cache reads a slice's raw bytes into a staging buffer, verifies them, and
a Decoder writes what the slot serves (for example quantized blocks dequantized to the compute dtype), so a hit
costs no decoding. Staging buffers are preallocated in the slot pool, one per thread that can load at once. An
in-place Decoder (one that only moves bytes, such as a realignment) is handed the raw bytes in the slot itself and
needs no staging buffer."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..model.layout import SliceKey
from .reads import BLOCK

DecodeFn = Callable[[SliceKey, dict[str, np.ndarray], dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class Decoder:
    """views[key]: each served part of the slice as (role, slot offset, bytes); decode(key, raw, out) fills the
    uint8 `out` views (by role) from the `raw` part views; raising refuses the slice, as a failed read does.
    in_place: `raw` and `out` are views of the same slot (decode must allow for the overlap)."""

    views: Mapping[SliceKey, tuple[tuple[str, int, int], ...]]
    decode: DecodeFn
    in_place: bool = False

    def slot_bytes(self, key: SliceKey) -> int:
        """Slot room for the decoded slice, whole blocks."""
        end = max(off + n for _, off, n in self.views[key])
        return -(-end // BLOCK) * BLOCK


def staging_bytes(raw_needs: Mapping[SliceKey, int], threads: int) -> tuple[int, int]:
    """(bytes per staging buffer, buffer count): the largest raw slot, for each worker plus one demand caller."""
    return max(raw_needs.values()), threads + 1
