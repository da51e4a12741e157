"""Durations of the definitions API: "30m", "14d" to microseconds and back, default hops."""

from __future__ import annotations

import re

from flows.errors import DefinitionError

_UNITS_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_SIX_HOURS = 6 * _UNITS_US["h"]
_MAX_DURATION_US = 36_525 * _UNITS_US["d"]  # 100 years: beyond it int64 µs arithmetic overflows
_THIRTY_DAYS = 30 * _UNITS_US["d"]


def parse_duration(text: str | int, what: str = "duration") -> int:
    """Parse "30m", "14d", "1h", "45s" into microseconds (an int is taken as seconds)."""
    if isinstance(text, bool):
        raise DefinitionError(f"{what} {text!r} is not a duration; write e.g. '30m', '14d'")
    if isinstance(text, int):
        if text <= 0:
            raise DefinitionError(f"{what} {text!r} must be positive; write e.g. '30m', '14d'")
        text = f"{text}s"
    match = _DURATION.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise DefinitionError(
            f"{what} {text!r} is not a duration; write a positive number and a unit s, m, h or d,"
            " e.g. '30m', '14d'"
        )
    us = int(match.group(1)) * _UNITS_US[match.group(2)]
    if us > _MAX_DURATION_US:
        raise DefinitionError(
            f"{what} {text!r} is longer than 100 years; for all of history leave the window "
            "out (a lifetime feature)"
        )
    return us


def format_duration(us: int) -> str:
    """The shortest exact spelling of a duration: 1209600000000 -> "14d"."""
    for unit in ("d", "h", "m", "s"):
        if us % _UNITS_US[unit] == 0:
            return f"{us // _UNITS_US[unit]}{unit}"
    raise DefinitionError(f"duration of {us} microseconds is not a whole number of seconds")


def default_hop(window_us: int) -> int:
    """1 minute for windows up to 6 h, 1 hour up to 30 d, 1 day beyond (ARCHITECTURE.md)."""
    if window_us <= _SIX_HOURS:
        return _UNITS_US["m"]
    if window_us <= _THIRTY_DAYS:
        return _UNITS_US["h"]
    return _UNITS_US["d"]
