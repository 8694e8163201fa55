"""A verify hook for SliceCache: a slice whose bytes do not match its recorded SHA-256 is refused, by name."""

from collections.abc import Mapping

import numpy as np

from ..errors import ExpertPagerError
from ..model.layout import ExpertSlice, SliceKey
from ..model.manifest import slice_digest


def checksum_verifier(slices: Mapping[SliceKey, ExpertSlice], checksums: Mapping[SliceKey, str]):
    """verify(key, views): raise ExpertPagerError naming the slice and file when its bytes have the wrong checksum
    (keys without a checksum, such as adapter pieces, pass)."""

    def verify(key: SliceKey, views: dict[str, np.ndarray]) -> None:
        if key not in checksums:
            return
        s = slices[key]
        if slice_digest(views[p.role] for p in s.parts) != checksums[key]:
            first = s.parts[0]
            raise ExpertPagerError(f"{first.file}: expert slice {key} (layer, expert) at byte {first.offset} is corrupt: "
                                   "its SHA-256 does not match the manifest; it was not used")

    return verify
