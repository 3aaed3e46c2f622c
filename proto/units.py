"""Byte counts as people write them (``1.5GiB``) and read them (``1.5 GiB``); shared by
the agent's ``--memory-budget``, the coordinator's status table and the reports."""

from __future__ import annotations

import re

_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1 << 10,
    "mb": 1000**2,
    "mib": 1 << 20,
    "gb": 1000**3,
    "gib": 1 << 30,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"1.5GiB"`` -> 1610612736. Units (case-insensitive): B, KB/KiB, MB/MiB, GB/GiB,
    TB/TiB; KB, MB, GB, TB are decimal (10³ⁿ), the -iB units binary (2¹⁰ⁿ); a bare
    number is bytes. Raises ValueError naming ``text`` for anything else."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in {"", *_UNITS}:
        raise ValueError(
            f"invalid memory size {text!r}: expected a number and a unit such as "
            "'512MiB', '1.5GiB' or '8GB' (units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
        )
    return round(float(match.group(1)) * _UNITS.get(unit, 1))


def format_bytes(n: int) -> str:
    """Bytes as text in the largest binary unit that keeps the number ≥ 1: ``"1.5 GiB"``,
    ``"200 MiB"``, ``"512 B"`` (up to 2 decimals; negative sizes keep their sign)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit.lower()]
        if n >= scale:
            value = f"{n / scale:.2f}".rstrip("0").rstrip(".")
            return f"{sign}{value} {unit}"
    return f"{sign}{n} B"
