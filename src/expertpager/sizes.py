"""Byte sizes as users write them: '8GB' (decimal, 10^9), '8GiB' (binary, 2^30), '512MB', plain bytes."""

import re

from .errors import ExpertPagerError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse '8GB', '8GiB', '1.5 GiB', '512MB' or '1234' into bytes (KB/MB/GB decimal, KiB/MiB/GiB and K/M/G binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ExpertPagerError(f"cannot read size {text!r}: use bytes or a unit such as 512MB, 8GB (10^9) or 8GiB (2^30)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int | float) -> str:
    """Binary units, 3 significant digits: 1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
