"""Validation of decoded log records, before they can touch a view: a record without a key or
an event time, with text that is not UTF-8, or with an event time outside the source's bounds
(further ahead of its arrival than `Source.max_future`, or before `Source.min_time`) becomes a
dead letter with the reason; the rest of the batch goes on. The same rules run for the live flow,
replays and snapshots, so all three see the same events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.envelope import ARRIVAL, OFFSET, DeadLetter
from connectors.log import LogBatch
from flows.aggregate import event_times
from flows.spec import Source


@dataclass(frozen=True, slots=True)
class EventRules:
    """What a source's records must satisfy to be events."""

    source: str
    key: str
    timestamp: str
    max_future_us: int | None = None
    min_time_us: int | None = None

    @classmethod
    def of(cls, source: Source) -> EventRules:
        return cls(
            source.name,
            source.key,
            source.timestamp,
            source.max_future_us(),
            source.min_time_us(),
        )


def validate(batch: LogBatch, rules: EventRules) -> LogBatch:
    """Move records that break `rules` to the batch's dead letters."""
    events = batch.events
    if events.num_rows == 0:
        return batch
    reasons = _reasons(events, rules)
    if not reasons:
        return batch
    bad = np.zeros(events.num_rows, dtype=bool)
    for rows, _ in reasons:
        bad[rows] = True
    letters = [
        DeadLetter(
            reason=f"source {rules.source!r}: record at offset {offset}: {why}",
            partition=batch.partition,
            offset=offset,
            payload=record_payload(events, row),
        )
        for rows, why_of in reasons
        for row, why in zip(rows.tolist(), why_of, strict=True)
        for offset in [int(events.column(OFFSET)[row].as_py())]
    ]
    return LogBatch(
        batch.source,
        batch.partition,
        events.filter(pa.array(~bad)),
        (*batch.dead_letters, *sorted(letters, key=lambda d: d.offset or 0)),
        batch.next_offset,
    )


Reasons = list[tuple[np.ndarray, list[str]]]  # (rows, one reason per row), first rule wins


def _reasons(events: pa.Table, rules: EventRules) -> Reasons:
    taken = np.zeros(events.num_rows, dtype=bool)
    out: Reasons = []
    for check in (_nulls, _invalid_text, _out_of_bounds):
        for rows, why in check(events, rules):
            fresh = ~taken[rows]
            rows, why = rows[fresh], [w for w, f in zip(why, fresh, strict=True) if f]
            if len(rows):
                taken[rows] = True
                out.append((rows, why))
    return out


def _nulls(events: pa.Table, rules: EventRules) -> Reasons:
    bad = pc.or_(pc.is_null(events.column(rules.key)), pc.is_null(events.column(rules.timestamp)))
    if not pc.any(bad).as_py():
        return []
    rows = np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool))
    key_null = events.column(rules.key).is_null().to_numpy(zero_copy_only=False)
    why = [
        f"field(s) {', '.join(repr(n) for n, miss in _missing(rules, key_null[r]) if miss)} null; "
        "events need an entity key and an event time"
        for r in rows
    ]
    return [(rows, why)]


def _missing(rules: EventRules, key_null: bool) -> list[tuple[str, bool]]:
    return [(rules.key, bool(key_null)), (rules.timestamp, not key_null)]


def _invalid_text(events: pa.Table, rules: EventRules) -> Reasons:
    out: Reasons = []
    for name in events.column_names:
        column = events.column(name)
        if not pa.types.is_string(column.type) or _valid_utf8(column):
            continue
        values = _binary_values(column)
        rows = [i for i, value in enumerate(values) if not _decodes(value)]
        why = [f"field {name!r} is not valid UTF-8 text; producers must write UTF-8"] * len(rows)
        out.append((np.asarray(rows, dtype=np.int64), why))
    return out


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _binary_values(column: pa.ChunkedArray) -> list[bytes | None]:
    values: list[bytes | None] = []
    for chunk in column.chunks:
        values.extend(chunk.view(pa.binary()).to_pylist())
    return values


def _decodes(value: bytes | None) -> bool:
    if value is None:
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _out_of_bounds(events: pa.Table, rules: EventRules) -> Reasons:
    if rules.max_future_us is None and rules.min_time_us is None:
        return []
    ts = _times(events, rules.timestamp)
    out: Reasons = []
    if rules.max_future_us is not None and ARRIVAL in events.column_names:
        arrival = events.column(ARRIVAL).cast(pa.int64()).to_numpy(zero_copy_only=False)
        ahead = ts - np.asarray(arrival, dtype=np.int64)
        rows = np.flatnonzero(ahead > rules.max_future_us)
        out.append((rows, [_future_reason(rules, int(ahead[r])) for r in rows]))
    if rules.min_time_us is not None:
        rows = np.flatnonzero(ts < rules.min_time_us)
        why = f"event time is before the source's min_time ({rules.min_time_us} µs since epoch)"
        out.append((rows, [why] * len(rows)))
    return out


def _times(events: pa.Table, name: str) -> np.ndarray:
    """Event times in µs, nulls as 0 (rows with a null time are dead letters already)."""
    column = events.column(name)
    if column.null_count:
        i = events.column_names.index(name)
        events = events.set_column(i, name, pc.fill_null(column, pa.scalar(0, column.type)))
    return event_times(events, name)


def _future_reason(rules: EventRules, ahead_us: int) -> str:
    bound = rules.max_future_us or 0
    return (
        f"event time {rules.timestamp!r} is {ahead_us / 1e6:,.0f}s ahead of the record's arrival "
        f"time, more than the source's max_future ({bound / 1e6:,.0f}s); fix the "
        "producer's clock or time unit, or raise Source(max_future=...)"
    )


def record_payload(events: pa.Table, row: int) -> bytes:
    """The record as JSON; text that is not UTF-8 keeps its bytes as backslash escapes."""
    record = {}
    for name in events.column_names:
        if name.startswith("_"):
            continue
        column = events.column(name).slice(row, 1)
        if pa.types.is_string(column.type):
            raw = _binary_values(column)[0]
            record[name] = None if raw is None else raw.decode("utf-8", "backslashreplace")
        else:
            record[name] = column.to_pylist()[0]
    return orjson.dumps(record, default=str)
