"""Validation of decoded log records: events without a key or an event time are dead letters."""

from __future__ import annotations

import orjson
import pyarrow.compute as pc

from connectors.envelope import DeadLetter
from connectors.log import LogBatch


def validate(batch: LogBatch, key: str, timestamp: str) -> LogBatch:
    """Move records with a null key or event time to the batch's dead letters."""
    events = batch.events
    if events.num_rows == 0:
        return batch
    bad = pc.or_(pc.is_null(events.column(key)), pc.is_null(events.column(timestamp)))
    if not pc.any(bad).as_py():
        return batch
    rejected = events.filter(bad)
    letters = [
        DeadLetter(
            reason=_reason(row, key, timestamp, batch.source),
            partition=batch.partition,
            offset=int(row["_offset"]),
            payload=_payload(row),
        )
        for row in rejected.to_pylist()
    ]
    return LogBatch(
        batch.source,
        batch.partition,
        events.filter(pc.invert(bad)),
        (*batch.dead_letters, *letters),
        batch.next_offset,
    )


def _reason(row: dict[str, object], key: str, timestamp: str, source: str) -> str:
    missing = [name for name in (key, timestamp) if row.get(name) is None]
    return (
        f"source {source!r}: field(s) {', '.join(map(repr, missing))} null in record at "
        f"offset {row['_offset']}; events need an entity key and an event time"
    )


def _payload(row: dict[str, object]) -> bytes:
    return orjson.dumps({k: v for k, v in row.items() if not k.startswith("_")}, default=str)
