"""Byte sizes as people write them: 400KB and 5GB are powers of 1000, 5GiB powers of 1024."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}  # fmt: skip


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000, '5GiB' -> 5 * 2**30, '400KB' -> 400_000, 1234 -> 1234.

    Example:
        >>> parse_size("2MiB")
        2097152
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"not a size: {text!r} (examples: 400KB, 5GB, 5GiB)")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
