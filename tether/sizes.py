"""Byte sizes as people write and read them: `parse_bytes("1GiB")` for options, `format_bytes(n)` for messages.

Shared by the client (progress, messages) and the server (its options, its job log). Imports nothing.
"""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """`"1GiB"`, `"512 MiB"`, `"2GB"`, `"1073741824"` -> bytes; ValueError naming the accepted units."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write a number of bytes with an optional unit, e.g. 1GiB, "
                         "512MiB, 64KiB, 2GB or 1073741824")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """`188743720` -> `"180.0 MiB"`; below 1 KiB, `"512 bytes"`."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
