"""Sizes and durations as people write them on a command line: ``16GiB``, ``24GB``, ``7d``, ``12h``."""

from __future__ import annotations

import re

# Binary prefixes are what GPUs and `nvidia-smi` report; decimal ones are what disk vendors sell.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3, "t": 1024**4, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}
_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``16GiB``, ``16G`` (binary), ``24GB`` (decimal), ``16000MiB``, ``512``.

    Raises ValueError, naming the accepted forms, for anything else (negative, no number,
    unknown unit, zero).
    """
    match = _NUMBER_UNIT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use a number with B, KiB, MiB, GiB, TiB, KB, MB, GB or TB, "
                         f"e.g. 16GiB)")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"not a size: {text!r} (must be more than 0 bytes)")
    return value


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``45s``, ``30m``, ``12h``, ``7d``, ``2w``. Raises ValueError otherwise."""
    match = _NUMBER_UNIT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use a number with s, m, h, d or w, e.g. 7d or 12h)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_size(n: float) -> str:
    """``n`` bytes with a binary prefix, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_age(seconds: float) -> str:
    """A short age: ``40s``, ``12m``, ``5h``, ``3d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
