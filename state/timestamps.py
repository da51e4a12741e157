"""The times the read API takes (`at=`): timezone-aware datetimes or epoch seconds, turned into
the epoch microseconds that tiles and windows are in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

Timestamp = datetime | int | float

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(t: Timestamp) -> int:
    """A timezone-aware datetime, or epoch seconds (int/float), as epoch microseconds."""
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError(
                f"timestamp {t!r} has no timezone; pass an aware datetime "
                "(e.g. datetime.now(timezone.utc))"
            )
        return (t - _EPOCH) // timedelta(microseconds=1)  # exact before 1970 too
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise TypeError(f"timestamp {t!r} must be an aware datetime or epoch seconds")
    return round(t * 1_000_000)
