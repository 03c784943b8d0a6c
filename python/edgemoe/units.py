"""Parsing and printing byte sizes ("512MiB", "1.5GB", "123456").

runtime_c/tools/edgemoe_run.c reads --budget by the same rules; keep the two alike."""
from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """Whole bytes ("123456", "123456B") or a decimal number with a unit (case-insensitive: KB, MB,
    GB = 10^3, 10^6, 10^9; KiB, MiB, GiB = 2^10, 2^20, 2^30), rounded down to whole bytes: "5.6MiB"
    is 5872025. Exact (no float rounding); a fraction of a byte without a unit is an error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: use bytes or a unit such as 64MiB, 1.5GB, 512KiB")
    unit = _UNITS[m.group(2).lower()]
    value = Fraction(m.group(1)) * unit
    if unit == 1 and value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes: give whole bytes or a unit such as 1.5MiB")
    return int(value)  # rounds down (the value is not negative)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
