"""Bytes in and out: the package counts in bytes and only turns them into GiB to print."""

from __future__ import annotations

import math
import re

KiB, MiB, GiB = 2**10, 2**20, 2**30
DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # what "24GB" on a spec sheet means
BINARY = {"kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40}
SHORT = {"k": KiB, "m": MiB, "g": GiB, "t": 2**40}  # "24G" as in `free -g`, docker --memory, nvidia-smi's MiB
_UNITS = {"b": 1, **DECIMAL, **BINARY, **SHORT}


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` as a short human string in binary units, e.g. ``"1.50 GiB"``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe_bytes(text: str) -> str:
    """How ``parse_bytes`` read ``text``, in GiB: ``"22.35 GiB (24GB = 24 x 10^9 bytes)"`` for a
    decimal unit, ``"24.00 GiB"`` for a binary one."""
    n_bytes = parse_bytes(text)
    unit = re.sub(r"[0-9.\s]", "", text).lower()
    if unit in DECIMAL:
        return f"{n_bytes / GiB:.2f} GiB ({text.strip()} = {n_bytes:,} bytes, decimal)"
    return f"{n_bytes / GiB:.2f} GiB"


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``"24GiB"``, ``"24G"``, ``"24GB"``, ``"24000MB"`` or ``"80 GiB"`` into bytes.

    Decimal units (KB, MB, GB, TB) are powers of 10, binary ones (KiB, MiB, GiB, TiB) powers of 2, and
    the one-letter K, M, G, T mean the binary ones (``24G`` = ``24GiB``). ``B`` is bytes. A size
    needs its unit: ``"24"`` raises ``ValueError``, as does anything else unreadable, or a size that
    is not positive or too large for a float.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match and not match.group(2):
        raise ValueError(f"memory size {text.strip()!r} has no unit: write 24GiB (or 24G), 24GB or 24000MB")
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write it like 24GiB (or 24G), 24GB or 24000MB")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(size):
        raise ValueError(f"memory size with {len(match.group(1))} digits is too large to count")
    n_bytes = int(size)
    if n_bytes <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return n_bytes
