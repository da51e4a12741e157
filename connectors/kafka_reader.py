"""The Kafka tail of the log, read: one partition of a source's topic from an offset, in batches
decoded to Arrow (source columns plus `_offset`, `_partition`, `_arrival`), with undecodable
messages (and tombstones) as dead letters at their offsets.

    topic partition --consume--> messages --decode_batch--> KafkaBatch(events, failures,
      (assigned, no group)                                            next_offset, at_end)

Offsets are the log's own: the reader assigns its partition itself and never commits to a
consumer group. If Kafka no longer holds an offset the log needs, it raises LogGapError
instead of skipping (the retention-gap rule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from connectors.avro import SchemaStore, decode_batch
from connectors.envelope import TIMESTAMP_US, DeadLetter, log_schema
from connectors.errors import ConnectorError, LogGapError, SchemaError
from connectors.kafka_admin import MISSING_TOPIC, consumer_config, fetch_watermarks
from connectors.kafka_logging import KAFKA_LOG

__all__ = ["KafkaBatch", "KafkaLogReader"]

_GONE = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}
_TOMBSTONE = "message has no value (a tombstone); events need an Avro value"
_FATAL = {
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
}


@dataclass(frozen=True, slots=True)
class KafkaBatch:
    """What one `read_batch` got: decoded events, dead letters, where to go on, and whether
    the partition's end (its high watermark when last seen) has been reached."""

    events: pa.RecordBatch
    failures: list[DeadLetter]
    next_offset: int
    at_end: bool


class KafkaLogReader:
    """Reads one partition of a topic from `start_offset`, decoding values with `store`.

    Raises (on construction):
        LogGapError: `start_offset` is below the partition's low watermark (retention passed).
        ConnectorError: the broker does not answer, the topic or partition does not exist, or
            `start_offset` is beyond the partition's end.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partition: int,
        start_offset: int,
        store: SchemaStore,
        arrow_schema: pa.Schema,
        *,
        key_field: str,
    ) -> None:
        if key_field not in arrow_schema.names:
            raise SchemaError(
                f"key field {key_field!r} is not a column of the source "
                f"({arrow_schema.names}); name the entity key field"
            )
        self.topic, self.partition, self.key_field = topic, partition, key_field
        self._store, self._schema = store, arrow_schema
        self._log_schema = log_schema(arrow_schema)
        self._consumer = Consumer(consumer_config(bootstrap))
        self._next, self._at_end = start_offset, False
        try:
            self._check_start(start_offset)
        except ConnectorError:
            self._consumer.close()
            raise
        self._consumer.assign([TopicPartition(topic, partition, start_offset)])

    def _check_start(self, start: int) -> None:
        low, high = self.watermarks()
        if start < low:
            raise LogGapError(
                f"topic {self.topic!r} partition {self.partition}: offsets [{start}, {low - 1}] "
                f"are no longer in Kafka (retention passed before they were archived); the log "
                "has a gap: restore them into warehouse segments, or replay from a later offset"
            )
        if start > high:
            raise ConnectorError(
                f"topic {self.topic!r} partition {self.partition}: start offset {start} is past "
                f"the partition's end {high}; the topic may have been recreated since the log "
                "was written: check --kafka and the topic name"
            )

    def read_batch(self, max_records: int = 5000, timeout_s: float = 0.1) -> KafkaBatch:
        """Up to `max_records` records, waiting at most `timeout_s` for the first.

        Raises:
            LogGapError: Kafka dropped the next offsets while reading (retention passed).
            ConnectorError: the topic or partition vanished, or the client failed fatally.
        """
        messages = self._consumer.consume(max_records, timeout_s)
        records = self._records(messages)
        values = [m.value() for m in records]
        offsets = np.array([m.offset() for m in records], dtype=np.int64)  # never None here
        arrivals = _arrivals_us(records)
        if len(records):
            self._next = int(offsets[-1]) + 1
        failures: list[DeadLetter] = []
        if None in values:  # tombstones: no value to decode
            empty = np.array([v is None for v in values])
            failures = [
                DeadLetter(_TOMBSTONE, self.partition, int(o), None) for o in offsets[empty]
            ]
            values = [v for v in values if v is not None]
            offsets, arrivals = offsets[~empty], arrivals[~empty]
        return self._batch(cast(list[bytes], values), offsets, arrivals, failures)

    def _records(self, messages: list[Message]) -> list[Message]:
        """The messages that are records; errors and end-of-partition events handled."""
        errors = [(i, e) for i, e in enumerate([m.error() for m in messages]) if e is not None]
        if not errors:
            self._at_end = self._at_end and not messages
            return messages
        for i, error in errors:
            self._on_error(error, messages[i])
        failed = {i for i, _ in errors}
        records = [m for i, m in enumerate(messages) if i not in failed]
        last_eof = max((i for i, e in errors if e.code() == KafkaError._PARTITION_EOF), default=-1)
        last_record = max((i for i in range(len(messages)) if i not in failed), default=-1)
        if last_record > last_eof:
            self._at_end = False
        return records

    def _on_error(self, error: KafkaError, message: Message) -> None:
        code = error.code()
        if code == KafkaError._PARTITION_EOF:
            self._at_end = True
            self._next = max(self._next, _offset(message))
        elif code in _GONE:
            raise LogGapError(
                f"topic {self.topic!r} partition {self.partition}: offset {self._next} is no "
                f"longer in Kafka ({error.str()}); low watermark is now {self.low_watermark()}: "
                "retention passed before the records were archived"
            )
        elif code in _FATAL or error.fatal():
            raise ConnectorError(
                f"topic {self.topic!r} partition {self.partition}: "
                f"{error.str()}; check that the topic exists"
            )
        else:  # transient (broker down, ...): librdkafka retries by itself
            KAFKA_LOG.warning("topic %r partition %d: %s", self.topic, self.partition, error.str())

    def _batch(
        self,
        values: list[bytes],
        offsets: np.ndarray,
        arrivals: np.ndarray,
        failures: list[DeadLetter],
    ) -> KafkaBatch:
        decoded, bad = decode_batch(self._store, values, self._schema)
        failures += [
            DeadLetter(reason, self.partition, int(offsets[i]), values[i]) for i, reason in bad
        ]
        keep = np.ones(len(values), dtype=bool)
        keep[[i for i, _ in bad]] = False
        log_columns = [
            pa.array(offsets[keep], pa.int64()),
            pa.array(np.full(int(keep.sum()), self.partition, dtype=np.int32)),
            pa.array(arrivals[keep], pa.int64()).cast(TIMESTAMP_US),
        ]
        events = pa.RecordBatch.from_arrays(
            [*decoded.columns, *log_columns], schema=self._log_schema
        )
        failures.sort(key=lambda d: d.offset if d.offset is not None else -1)
        return KafkaBatch(events, failures, self._next, self._at_end)

    def watermarks(self, timeout_s: float = 10.0) -> tuple[int, int]:
        """The partition's (low, high) watermarks: first offset held, offset after the last."""
        return fetch_watermarks(self._consumer, self.topic, self.partition, timeout_s)

    def partition_count(self, timeout_s: float = 1.0) -> int | None:
        """The topic's number of partitions now: 0 if the broker no longer knows the topic,
        None if the broker did not answer within `timeout_s` (an outage: ask again later)."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException:
            return None
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None:
            unknown = found is None or found.error.code() in MISSING_TOPIC
            return 0 if unknown else None
        return len(found.partitions)

    def low_watermark(self) -> int:
        """The first offset Kafka still holds for the partition."""
        return self.watermarks()[0]

    def high_watermark(self) -> int:
        """The offset after the last record of the partition, as of now."""
        return self.watermarks()[1]

    def cached_high_watermark(self) -> int | None:
        """The high watermark from the latest fetch response (no broker round trip)."""
        tp = TopicPartition(self.topic, self.partition)
        try:
            marks = self._consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            return None
        return None if marks is None or marks[1] < 0 else int(marks[1])

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> KafkaLogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _offset(message: Message) -> int:
    offset = message.offset()
    if offset is None:
        raise ConnectorError(f"topic {message.topic()!r}: a message without an offset")
    return offset


def _arrivals_us(records: list[Message]) -> np.ndarray:
    """Kafka message times in µs; the time of reading where a message has none."""
    stamps = np.array([m.timestamp() for m in records], dtype=np.int64).reshape(-1, 2)
    arrivals: np.ndarray = stamps[:, 1] * 1000
    arrivals[stamps[:, 0] == TIMESTAMP_NOT_AVAILABLE] = time.time_ns() // 1000
    return arrivals
