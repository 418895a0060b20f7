"""Durations as policies write them: ``7d``, ``36h``, ``1d12h``, ``90m``, ``2w``.

One or more ``<integer><unit>`` parts, units ``w`` (weeks), ``d``, ``h``, ``m``, ``s``,
each unit at most once and from the largest down; the total must be positive.
:func:`format_duration` writes the canonical form back (``36h`` → ``1d12h``), which
:func:`parse_duration` reads again, so a policy saved as JSON or YAML round-trips.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_PATTERN = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_MAX_SECONDS = 100 * 365 * 86400  # far beyond any collateral lifetime; keeps timedelta in range


def parse_duration(text: str) -> timedelta:
    """``"7d"`` → ``timedelta(days=7)``; :class:`ValueError` with a plain message otherwise."""
    match = _PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration: write e.g. 7d, 36h, 1d12h, 90m (units w, d, h, m, s)")
    seconds = sum(int(n) * size for n, (_, size) in zip(match.groups(), _UNITS, strict=True) if n)
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be longer than zero")
    if seconds > _MAX_SECONDS:
        raise ValueError(f"{text!r}: a duration must be at most 100 years")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The canonical text of a whole-second duration: days, hours, minutes, seconds (``1d12h``)."""
    rest = int(value.total_seconds())
    if rest <= 0:
        return "0s"
    parts = []
    for unit, size in _UNITS[1:]:  # weeks are read, never written: 14d reads better than 2w
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)
