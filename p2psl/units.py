"""Human-readable quantities in topology files: sizes, bandwidths and latencies.

Each parser returns a number in base units (bytes, bytes per second, seconds) or raises
`ValueError` with a message that says what was expected; the topology loader turns that into a
problem naming the key.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*"

_SIZE_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}

# bandwidth units: a prefix and a unit per second, whose case tells bits from bytes ("Mbit/s",
# "Mb/s", "Mbps": megabits; "MB/s", "MBps", "MiB/s": megabytes)
_RATE_PREFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_BIT_SUFFIXES = ("bit/s", "bits/s")
_CASED_SUFFIXES = ("b/s", "bps")  # a lower-case b is bits, an upper-case B bytes

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "": 1.0}


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a {what} such as {example!r}, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(_NUMBER + r"([A-Za-zµ/]*)\s*", text)
        if not match:
            raise ValueError(f"expected a {what} such as {example!r}, got {text!r}")
        value, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(value) or value < 0:  # TOML numbers may be nan, inf or negative
        raise ValueError(f"expected a {what} such as {example!r} (finite, not negative), got {text!r}")
    return value, unit


def parse_size(text: str | int) -> int:
    """'2GiB' → 2147483648. Binary (KiB, MiB, GiB) and decimal (KB, MB, GB) units; bare = bytes."""
    value, unit = _split(text, "size", "2GiB")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return int(value * factor)


def parse_bandwidth(text: str | float) -> float:
    """'8Mbit/s' → 1e6 bytes per second. Bits (bit/s, Mbit/s, Mb/s, Mbps) or bytes (MB/s,
    MBps, MiB/s): the case of the b tells them apart."""
    value, unit = _split(text, "bandwidth", "8Mbit/s")
    if unit == "":
        raise ValueError(f"bandwidth {text!r} needs a unit such as Mbit/s or MB/s")
    factor = _rate_factor(unit)
    if factor is None:
        raise ValueError(f"unknown bandwidth unit {unit!r} in {text!r} (use Mbit/s, Gbit/s, MB/s, MiB/s)")
    if value <= 0:
        raise ValueError(f"bandwidth must be positive, got {text!r}")
    return value * factor


def _rate_factor(unit: str) -> float | None:
    """Bytes per second in one `unit`, or None for no bandwidth unit."""
    lower = unit.lower()
    for suffix in _BIT_SUFFIXES + _CASED_SUFFIXES:
        if lower.endswith(suffix):
            prefix = _RATE_PREFIXES.get(lower[:-len(suffix)])
            bits = suffix in _BIT_SUFFIXES or unit[-len(suffix)] == "b"
            return None if prefix is None else prefix / 8 if bits else prefix
    return None


def parse_duration(text: str | float) -> float:
    """'20ms' → 0.02 seconds. Units s, ms, us, ns; a bare number is seconds."""
    value, unit = _split(text, "duration", "20ms")
    factor = _TIME_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown time unit {unit!r} in {text!r} (use s, ms, us)")
    return value * factor


def format_bytes(n: float) -> str:
    """4294967296 → '4.0 GiB' (for messages and tables)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_rate(bytes_per_s: float | None) -> str:
    """1e6 → '8 Mbit/s'; None means unlimited."""
    if bytes_per_s is None:
        return "unlimited"
    bits = bytes_per_s * 8
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= size:
            return f"{bits / size:g} {unit}"
    return f"{bits:g} bit/s"


def span(first: int, last: int) -> str:
    """'3' or '3–5': an inclusive range of numbered things (layers, rounds)."""
    return f"{first}" if first == last else f"{first}–{last}"


def layers(first: int, last: int) -> str:
    """'layer 3' or 'layers 3–5'."""
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 round', '3 rounds', '1 data owner' ("compute node" → "compute nodes"; `many` for the
    irregular)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
