"""The event envelope: the log columns every record carries next to its source columns, and the
dead-letter record that takes the place of an event that cannot be read (or is too late).

A record of the log is the source's Avro fields (typed Arrow columns) plus

    _offset     int64                 position in its partition (one offset space per partition,
                                      shared by warehouse segments and Kafka)
    _partition  int32                 the partition (murmur2 of the entity key)
    _arrival    timestamp[us, UTC]    ingestion time (Kafka message time, or the ingest run)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

OFFSET = "_offset"
PARTITION = "_partition"
ARRIVAL = "_arrival"

TIMESTAMP_US = pa.timestamp("us", tz="UTC")
# Fields are nullable in the Arrow sense (as pyarrow makes them by default), so tables built
# elsewhere concatenate with ours; the writers guarantee that log columns hold no nulls.
LOG_FIELDS: tuple[pa.Field, ...] = (
    pa.field(OFFSET, pa.int64()),
    pa.field(PARTITION, pa.int32()),
    pa.field(ARRIVAL, TIMESTAMP_US),
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("reason", pa.string()),
        pa.field("partition", pa.int32()),
        pa.field("offset", pa.int64()),
        pa.field("payload", pa.binary()),
        pa.field("at", TIMESTAMP_US),
    ]
)


PayloadFormat = Literal["original", "avro-single-object", "json"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not become an event, or an event too late for a view: why, where it
    was in the log, its raw bytes.

    `partition` and `offset` are None for rows that never had a log position (bad input files);
    `payload` is the original message value, or a rendering of the original row (JSON, or for
    a late event the source's single-object Avro). `payload_format` is set for late events
    ("avro-single-object" or "json"; other letters carry "original"), and `view` and `version`
    name the view version the event was late for (None for every other dead letter).
    """

    reason: str
    partition: int | None
    offset: int | None
    payload: bytes | None
    payload_format: PayloadFormat = "original"
    view: str | None = None
    version: int | None = None


def log_schema(source_schema: pa.Schema) -> pa.Schema:
    """The schema of a log record batch: the source's columns, then the log columns."""
    return pa.schema([*source_schema, *LOG_FIELDS])


def dead_letter_table(letters: list[DeadLetter], at_us: int) -> pa.Table:
    """Dead letters as a table of DEAD_LETTER_SCHEMA, all stamped with `at_us` (µs, UTC)."""
    return pa.table(
        {
            "reason": [d.reason for d in letters],
            "partition": [d.partition for d in letters],
            "offset": [d.offset for d in letters],
            "payload": [d.payload for d in letters],
            "at": pa.array([at_us] * len(letters), pa.int64()).cast(TIMESTAMP_US),
        },
        schema=DEAD_LETTER_SCHEMA,
    )
