"""Memory sizes: parse ``"24GiB"``/``"80GB"``/``"1.5 GiB"``/``"123"`` into bytes and format bytes for people.

Bytes are ``int`` everywhere in memprof; this module is the only place that turns them into text.
Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) powers of 1000, as on
GPU spec sheets ("80GB") — note that NVIDIA's "80GB" H100 reports 79.6 GiB (85,520,809,984 bytes) to NVML.
"""

from __future__ import annotations

import re

from .errors import SizeFormatError

__all__ = ["parse_size", "format_bytes", "UNITS"]

UNITS = {
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
    "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return ``value`` in bytes. Integers pass through; strings take an optional unit (case-insensitive)."""
    if isinstance(value, bool):
        raise SizeFormatError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeFormatError(f"memory size must not be negative: {value}")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise SizeFormatError(f"not a memory size: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise SizeFormatError(f"not a memory size: {value!r}")
    m = _SIZE.match(value)
    if not m:
        raise SizeFormatError(f"not a memory size: {value!r} (write e.g. 24GiB, 80GB, 512MiB or a number of bytes)")
    number, unit = m.groups()
    factor = UNITS.get(unit.upper() or "B")
    if factor is None:
        raise SizeFormatError(f"unknown unit {unit!r} in {value!r}; use one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    return int(round(float(number) * factor))


_AUTO = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_bytes(n: int | float | None, units: str = "auto", precision: int = 2) -> str:
    """Format a byte count: ``auto`` picks the largest binary unit with a value of at least 1."""
    if n is None:
        return "-"
    if units == "B":
        return f"{int(n):,} B"
    if units != "auto":
        factor = UNITS.get(units.upper())
        if factor is None:
            raise SizeFormatError(f"unknown unit {units!r}")
        return f"{n / factor:,.{precision}f} {units}"
    for name, factor in _AUTO:
        if abs(n) >= factor:
            return f"{n / factor:,.{precision}f} {name}"
    return f"{int(n):,} B"
