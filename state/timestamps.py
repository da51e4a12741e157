"""The times the read API takes (`at=`): timezone-aware datetimes or epoch seconds, turned into
the epoch microseconds that tiles and windows are in."""

from __future__ import annotations

import math
import numbers
from datetime import UTC, datetime, timedelta

Timestamp = datetime | int | float

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_SECONDS = 253_402_300_800  # 10000-01-01: a larger epoch number is not in seconds


def to_micros(t: Timestamp) -> int:
    """A timezone-aware datetime, or epoch seconds (int/float), as epoch microseconds."""
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError(
                f"timestamp {t!r} has no timezone; pass an aware datetime "
                "(e.g. datetime.now(timezone.utc))"
            )
        return (t - _EPOCH) // timedelta(microseconds=1)  # exact before 1970 too
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"timestamp {t!r} must be an aware datetime or epoch seconds")
    if not math.isfinite(t) or abs(t) >= _MAX_SECONDS:
        raise ValueError(
            f"timestamp {t!r} is not epoch seconds (years 1 to 9999); at= takes epoch seconds "
            "or an aware datetime: divide a time in milliseconds by 1e3, in microseconds by "
            "1e6, in nanoseconds by 1e9"
        )
    if isinstance(t, numbers.Integral):
        return int(t) * 1_000_000
    return round(float(t) * 1_000_000)
