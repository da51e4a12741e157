"""The dead-letter output: bad and too-late records are kept, with the reason, never dropped.

With Kafka, dead letters go to the topic `<source>.dlq` (value: the original bytes; headers:
reason, partition, offset); without Kafka, to Parquet files under
`<warehouse>/<source>/_deadletter/`. Either way they are counted in the flow's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from connectors.envelope import DeadLetter, dead_letter_table
from connectors.segments import write_dead_letters


def dlq_topic(source: str) -> str:
    return f"{source}.dlq"


class DeadLetterWriter:
    """Writes dead letters of one source to Kafka (`<source>.dlq`) or the warehouse."""

    def __init__(self, warehouse: Path, source: str, kafka_bootstrap: str | None) -> None:
        self._warehouse, self._source = warehouse, source
        self._producer: Any = None
        if kafka_bootstrap:
            from confluent_kafka import Producer

            self._producer = Producer(
                {
                    "bootstrap.servers": kafka_bootstrap,
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    "logger": logging.getLogger("connectors.kafka"),
                }
            )

    def write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        if self._producer is not None:
            for d in letters:
                headers = [
                    ("reason", d.reason.encode()),
                    ("partition", str(d.partition).encode()),
                    ("offset", str(d.offset).encode()),
                ]
                self._producer.produce(dlq_topic(self._source), value=d.payload, headers=headers)
            self._producer.flush(30)
            return
        now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
        write_dead_letters(self._warehouse, self._source, dead_letter_table(list(letters), now_us))

    def write_late(self, late: pa.Table, view: str, partition: int) -> None:
        """Events too late for `view` (older than its retention behind the watermark)."""
        rows = late.to_pylist()
        self.write(
            [
                DeadLetter(
                    reason=f"view {view!r}: event at offset {row['_offset']} is too late "
                    "(older than the view's retention behind the partition's newest "
                    "event time); raise allowed_lateness to keep such events",
                    partition=partition,
                    offset=int(row["_offset"]),
                    payload=orjson.dumps(
                        {k: v for k, v in row.items() if not k.startswith("_")}, default=str
                    ),
                )
                for row in rows
            ]
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(30)
