"""The Kafka tail of the log: reads one partition of a source's topic from an offset, in
batches decoded to Arrow (source columns plus `_offset`, `_partition`, `_arrival`), with
undecodable messages as dead letters; a producer of single-object encoded Avro keyed by
entity key, partitioned as ingest partitions (murmur2); and the dead-letter sink of a source's
`.dlq` topic (every letter confirmed by the broker, oversized ones truncated to fit).

Offsets are the log's own: the reader assigns its partition itself and never commits to a
consumer group. If Kafka no longer holds an offset the log needs, it raises LogGapError
instead of skipping (the retention-gap rule). A topic that does not exist is a
TopicMissingError (the broker's UNKNOWN_TOPIC_OR_PART), told apart by its code.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined, unused-ignore]

from connectors.avro import SchemaStore, SingleObjectWriter, decode_batch
from connectors.envelope import TIMESTAMP_US, DeadLetter, log_schema
from connectors.errors import (
    ConnectorError,
    DeadLetterError,
    LogGapError,
    SchemaError,
    TopicMissingError,
)

__all__ = [
    "AvroProducer",
    "DeadLetter",
    "KafkaBatch",
    "KafkaDeadLetterSink",
    "KafkaLogReader",
    "RateLimitFilter",
    "ensure_topic",
    "list_partitions",
    "offset_at_time",
    "partition_watermarks",
]

_LOG = logging.getLogger(__name__)  # librdkafka's own log lines go here, not to stderr
_DIGITS = re.compile(r"\d+")
# Retriable while a new topic's partitions get their leaders (or its metadata spreads).
_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.FENCED_LEADER_EPOCH,
    KafkaError.UNKNOWN_LEADER_EPOCH,
}
_GONE = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}
_MISSING_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
_TOMBSTONE = "message has no value (a tombstone); events need an Avro value"
_FATAL = {
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
}
PRODUCER_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
# Bytes of a one-record batch besides key, value and headers: the v2 batch header (61) and
# the record's framing varints, with a margin; a broker refusal halves the budget anyway.
FRAMING_BYTES = 61 + 40
HEADER_FRAMING_BYTES = 10
DELIVERY_TIMEOUT_S = 120.0  # librdkafka retries through a broker outage this long
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}  # refused by the producer or by the broker
_SIZE_RETRIES = 4


class RateLimitFilter(logging.Filter):
    """Lets one log line per distinct message through every `interval_s` seconds (messages that
    differ only in numbers count as one); the next line let through says how many like it were
    suppressed. librdkafka repeats a failing connect ~20 times a second per client during a
    broker outage."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (time let through, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = _DIGITS.sub("#", record.getMessage()), time.monotonic()
        with self._lock:
            since, suppressed = self._seen.get(key, (-math.inf, 0))
            if now - since < self.interval_s:
                self._seen[key] = (since, suppressed + 1)
                return False
            if len(self._seen) > 1000:  # forget messages that went quiet
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = (now, 0)
        if suppressed:
            record.msg = (
                f"{record.getMessage()} ({suppressed} more like it in the last "
                f"{now - since:.0f} s suppressed)"
            )
            record.args = ()
        return True


_LOG.addFilter(RateLimitFilter())


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
        self._consumer = Consumer(_consumer_config(bootstrap))
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
            _LOG.warning("topic %r partition %d: %s", self.topic, self.partition, error.str())

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
        return _watermarks(self._consumer, self.topic, self.partition, timeout_s)

    def partition_count(self, timeout_s: float = 1.0) -> int | None:
        """The topic's number of partitions now: 0 if the broker no longer knows the topic,
        None if the broker did not answer within `timeout_s` (an outage: ask again later)."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException:
            return None
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None:
            unknown = found is None or found.error.code() in _MISSING_TOPIC
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


def _consumer_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": "featureflow-log-reader",  # required by librdkafka; never joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "error",  # a vanished offset is a gap to report, never a skip
        "logger": _LOG,
    }


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


class AvroProducer:
    """Produces records of one schema to a topic: key = entity key (UTF-8), value = single-object
    Avro; partitioned with murmur2 as the warehouse ingest partitions."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        schema: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self._writer = SingleObjectWriter(schema)
        self._errors: list[str] = []
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "linger.ms": 5,
                "logger": _LOG,
                **(config or {}),
            }
        )

    def produce(self, records: Sequence[Mapping[str, Any]], key_field: str) -> None:
        """Queue `records` for sending (see `flush`).

        Raises:
            ConnectorError: a record has no value for `key_field`.
            SchemaError: a record does not match the schema.
        """
        for i, record in enumerate(records):
            key = record.get(key_field)
            if key is None:
                raise ConnectorError(
                    f"record {i} has no value for key field {key_field!r}; "
                    "every event needs its entity key"
                )
            self._send(str(key).encode("utf-8"), self._writer.encode(record))

    def _send(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, on_delivery=self._delivered
                )
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._errors.append(error.str())

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is delivered.

        Raises:
            ConnectorError: records remain undelivered after `timeout_s`, or a delivery failed.
        """
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise ConnectorError(
                f"{remaining} records to topic {self.topic!r} were not "
                f"delivered within {timeout_s} s; check that the broker runs"
            )
        if self._errors:
            errors, self._errors = self._errors, []
            raise ConnectorError(
                f"{len(errors)} records to topic {self.topic!r} failed: {errors[0]}"
            )


@dataclass(frozen=True, slots=True)
class _Letter:
    """A dead letter as a Kafka message, before it is fitted to the topic's size limit."""

    key: bytes
    payload: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class KafkaDeadLetterSink:
    """A source's dead letters in its `.dlq` topic: every message confirmed, oversized ones
    truncated to fit (a `connectors.deadletters.DeadLetterSink`).

        key      b"<partition>:<offset>" (log offsets; b"-" for a row without a log position)
        value    the letter's payload, cut to what the topic accepts
        headers  reason, source, partition, offset, payload_format, (view, version: for a
                 late event), original_size (bytes of the whole payload), truncated
                 ("true"/"false")

    A letter larger than the topic accepts (its `max.message.bytes`, at most 1 MB by the
    producer's default) is written truncated to fit; a topic too small even for the key and
    headers is a DeadLetterError. The topic is looked up (and created with 1 partition if
    missing) at the first letter, not before: a flow without dead letters makes no topic.
    """

    def __init__(self, bootstrap: str, topic: str, source: str) -> None:
        self.topic, self._bootstrap, self._source = topic, bootstrap, source
        self._limit = 0
        self._started: Producer | None = None

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Deliver `letters`; returns once the broker confirmed every one.

        Raises:
            DeadLetterError: a letter cannot fit the topic, or was not delivered.
        """
        if letters:
            self._send([self._letter(d) for d in letters])

    def _letter(self, d: DeadLetter) -> _Letter:
        key = b"-" if d.offset is None else f"{d.partition}:{d.offset}".encode()
        headers = [
            ("reason", d.reason.encode()),
            ("source", self._source.encode()),
            ("partition", str(d.partition).encode()),
            ("offset", str(d.offset).encode()),
            ("payload_format", d.payload_format.encode()),
        ]
        if d.view is not None:  # a late event: the view version it was late for
            headers += [("view", d.view.encode()), ("version", str(d.version).encode())]
        return _Letter(key, d.payload, tuple(headers))

    def _producer(self) -> Producer:
        """The producer, made at first use (when the topic's size limit is looked up)."""
        if self._started is None:
            self._limit = topic_message_limit(self._bootstrap, self.topic)
            self._started = Producer(
                {
                    "bootstrap.servers": self._bootstrap,
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    # One batch never exceeds what the topic accepts, so small letters are
                    # never refused for sharing a batch with others.
                    "message.max.bytes": max(1000, self._limit),
                    "batch.size": max(1, self._limit),
                    "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
                    "logger": _LOG,
                }
            )
        return self._started

    def _send(self, letters: Sequence[_Letter]) -> None:
        self._producer()  # fixes the topic's limit on first use
        pending, limit = list(letters), self._limit
        for _ in range(_SIZE_RETRIES):
            failed = self._deliver([self._fit(d, limit) for d in pending])
            too_large = [pending[i] for i, e in failed if e.code() in _TOO_LARGE]
            others = [(pending[i], e) for i, e in failed if e.code() not in _TOO_LARGE]
            if others:
                letter, error = others[0]
                raise DeadLetterError(
                    f"{len(others)} dead letter(s) to topic {self.topic!r} were not delivered, "
                    f"the first (key {letter.key.decode()}): {error.str()}; the offsets that "
                    "produced them are not committed: check the broker and the topic, then "
                    "restart the flow (it retries them)"
                )
            if not too_large:
                return
            pending, limit = too_large, limit // 2  # the broker counts more framing than we
        raise DeadLetterError(
            f"{len(pending)} dead letter(s) were refused as too large by topic {self.topic!r} "
            f"even truncated to {limit} bytes; raise the topic's max.message.bytes and restart"
        )

    def _fit(self, letter: _Letter, limit: int) -> tuple[bytes, bytes | None, list[Any]]:
        """(key, value, headers) of a letter, its value truncated to fit in `limit` bytes."""
        size = -1 if letter.payload is None else len(letter.payload)
        headers = [*letter.headers, ("original_size", str(size).encode())]
        overhead = FRAMING_BYTES + len(letter.key) + len(b"truncated") + len(b"false")
        overhead += sum(len(k) + len(v) + HEADER_FRAMING_BYTES for k, v in headers)
        budget = limit - overhead - HEADER_FRAMING_BYTES
        if budget < 0:
            raise DeadLetterError(
                f"dead letter {letter.key.decode()}: topic {self.topic!r} accepts messages of "
                f"at most {limit} bytes (max.message.bytes), fewer than the letter's key and "
                f"headers take ({overhead} bytes); raise the topic's max.message.bytes to at "
                "least 4096 and restart the flow (the offsets were not committed)"
            )
        value, truncated = letter.payload, size > budget
        if truncated and value is not None:
            value = value[:budget]
        return letter.key, value, [*headers, ("truncated", b"true" if truncated else b"false")]

    def _deliver(
        self, messages: Sequence[tuple[bytes, bytes | None, list[Any]]]
    ) -> list[tuple[int, KafkaError]]:
        """Produce `messages` and wait for every delivery report; the failures by index."""
        failed: list[tuple[int, KafkaError]] = []
        for i, (key, value, headers) in enumerate(messages):

            def report(error: KafkaError | None, _msg: Message, i: int = i) -> None:
                if error is not None:
                    failed.append((i, error))

            self._produce(key, value, headers, report, failed, i)
        self._wait()
        return failed

    def _produce(
        self,
        key: bytes,
        value: bytes | None,
        headers: list[Any],
        report: Any,
        failed: list[tuple[int, KafkaError]],
        i: int,
    ) -> None:
        while True:
            try:
                self._producer().produce(
                    self.topic, value=value, key=key, headers=headers, on_delivery=report
                )
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer().poll(0.1)
            except KafkaException as exc:  # refused before sending (e.g. too large)
                failed.append((i, exc.args[0]))
                return

    def _wait(self) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S + 30
        while self._producer().flush(1.0) > 0:
            if time.monotonic() > deadline:
                raise DeadLetterError(
                    f"{len(self._producer())} dead letter(s) to topic {self.topic!r} were not "
                    f"confirmed within {DELIVERY_TIMEOUT_S + 30:.0f} s; the offsets that "
                    "produced them are not committed: check the broker, then restart the flow"
                )

    def close(self) -> None:
        if self._started is not None:
            self._wait()


def topic_message_limit(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """The largest message `topic` accepts (its max.message.bytes, at most the producer's
    default); the topic is created (1 partition) if it does not exist.

    Raises:
        DeadLetterError: the broker does not answer, or the topic cannot be created.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _LOG}
    admin = AdminClient(config)
    try:
        if topic not in admin.list_topics(timeout=timeout_s).topics:
            _create_dlq(admin, topic, timeout_s)
        resource = ConfigResource("topic", topic)
        configs = admin.describe_configs([resource])[resource].result(timeout_s)
    except KafkaException as exc:
        raise DeadLetterError(
            f"dead-letter topic {topic!r}: the broker did not describe it "
            f"({exc.args[0].str()}); check --kafka and that the broker runs"
        ) from exc
    entry = configs.get("max.message.bytes")
    topic_max = int(entry.value) if entry is not None and entry.value else PRODUCER_MAX_BYTES
    return min(topic_max, PRODUCER_MAX_BYTES)


def _create_dlq(admin: AdminClient, topic: str, timeout_s: float) -> None:
    future = admin.create_topics([NewTopic(topic, 1, 1)])[topic]
    try:
        future.result(timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def partition_watermarks(
    bootstrap: str, topic: str, partition: int, timeout_s: float = 10.0
) -> tuple[int, int]:
    """(low, high) watermarks of one partition, without reading it.

    Raises:
        ConnectorError: the broker does not answer, or the topic or partition does not exist.
    """
    consumer = Consumer(_consumer_config(bootstrap))
    try:
        return _watermarks(consumer, topic, partition, timeout_s)
    finally:
        consumer.close()


def offset_at_time(
    bootstrap: str, topic: str, partition: int, at_ms: int, timeout_s: float = 10.0
) -> int:
    """The first offset of a partition whose message time is at or after `at_ms` (ms since the
    epoch); the partition's end if every message is older.

    Raises:
        ConnectorError: the broker does not answer, or the topic or partition does not exist.
    """
    consumer = Consumer(_consumer_config(bootstrap))
    try:
        (found,) = consumer.offsets_for_times(
            [TopicPartition(topic, partition, at_ms)], timeout=timeout_s
        )
        if found.error is None and found.offset >= 0:
            return int(found.offset)
        if found.error is None:  # no message that late
            return _watermarks(consumer, topic, partition, timeout_s)[1]
        error = found.error
    except KafkaException as exc:
        error = exc.args[0]
    finally:
        consumer.close()
    raise ConnectorError(
        f"topic {topic!r} partition {partition}: cannot find the offset at time {at_ms} ms "
        f"({error.str()}); check that the broker runs and the topic exists"
    )


def _watermarks(
    consumer: Consumer, topic: str, partition: int, timeout_s: float
) -> tuple[int, int]:
    """(low, high) of a partition; retried while its leader is not known yet (a topic just
    created answers "Not leader for partition" for a moment)."""
    deadline = time.monotonic() + timeout_s
    tp = TopicPartition(topic, partition)
    while True:
        try:
            marks = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            break
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in _NOT_READY and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise ConnectorError(
                f"topic {topic!r} partition {partition}: cannot get its offsets "
                f"({error.str()}); check that the broker runs and the topic "
                "exists with the source's number of partitions"
            ) from exc
    if marks is None:
        raise ConnectorError(
            f"topic {topic!r} partition {partition}: the broker did not give "
            f"its offsets within {timeout_s} s; check --kafka"
        )
    return int(marks[0]), int(marks[1])


def list_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """The number of partitions of `topic`.

    Raises:
        TopicMissingError: the topic does not exist.
        ConnectorError: the broker does not answer within `timeout_s`, or reports another
            error for the topic.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _LOG}
    admin = AdminClient(config)
    try:
        # All topics, not just this one: asking for one may auto-create it on some brokers.
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ConnectorError(
            f"Kafka at {bootstrap} did not answer within {timeout_s} s "
            f"({exc.args[0].str()}); start the broker or fix --kafka"
        ) from exc
    found = metadata.topics.get(topic)
    if found is None or (found.error is not None and found.error.code() in _MISSING_TOPIC):
        raise TopicMissingError(
            f"topic {topic!r} does not exist on Kafka at {bootstrap}; create "
            "it with the source's number of partitions"
        )
    if found.error is not None:
        raise ConnectorError(
            f"topic {topic!r} on Kafka at {bootstrap}: the broker reports "
            f"{found.error.str()}; check the topic and the client's rights to it"
        )
    return len(found.partitions)


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 10.0) -> bool:
    """Make sure `topic` exists with exactly `partitions` partitions; True if it was created.

    The partition count is part of the log's identity: keys are placed by murmur2 modulo the
    count, so a topic with another count would scatter a key's events.

    Raises:
        ConnectorError: the broker does not answer, or the topic has another partition count.
    """
    try:
        found = list_partitions(bootstrap, topic, timeout_s)
    except TopicMissingError:
        found = 0
    if found and found != partitions:
        raise ConnectorError(
            f"topic {topic!r} has {found} partitions but its source declares {partitions}; "
            "keys are placed by murmur2 modulo the partition count, so they must agree: fix "
            "Source(partitions=...) or use another topic"
        )
    if found:
        return False
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _LOG}
    admin = AdminClient(config)
    future = admin.create_topics([NewTopic(topic, partitions, 1)])[topic]
    try:
        future.result(timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise ConnectorError(f"cannot create topic {topic!r}: {exc.args[0].str()}") from exc
    _wait_for_leaders(admin, topic, timeout_s)
    return True


def _wait_for_leaders(admin: AdminClient, topic: str, timeout_s: float) -> None:
    """A new topic serves reads only once every partition has a leader."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = admin.list_topics(timeout=timeout_s).topics.get(topic)
        if (
            found is not None
            and found.error is None
            and found.partitions
            and all(p.leader >= 0 and p.error is None for p in found.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise ConnectorError(
        f"topic {topic!r} was created but its partitions got no leader within "
        f"{timeout_s} s; check the broker"
    )
