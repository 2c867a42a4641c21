"""Bytes in and out: the package counts in bytes and only turns them into GiB to print."""

from __future__ import annotations

import math
import re

KiB, MiB, GiB = 2**10, 2**20, 2**30
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40,
}


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` as a short human string in binary units, e.g. ``"1.50 GiB"``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``"24GiB"``, ``"24GB"``, ``"24000MB"`` or ``"80 GiB"`` into bytes.

    Decimal units (GB, MB) are powers of 10, binary ones (GiB, MiB) powers of 2. Raises
    ``ValueError`` on anything else, or on a size that is not positive or too large for a float.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write it like 24GiB, 24GB or 24000MB")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(size):
        raise ValueError(f"memory size with {len(match.group(1))} digits is too large to count")
    n_bytes = int(size)
    if n_bytes <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return n_bytes
