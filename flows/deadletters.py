"""The dead-letter output: bad and too-late records are kept, with the reason, never dropped.

Dead letters are part of the exactly-once commit: the sink writes a batch's dead letters before
it commits the offsets that produced them, and `DeadLetterWriter.write` returns only once every
one is confirmed (Kafka delivery reports checked, nothing left in the producer's queue); else it
raises `DeadLetterError`, the flow stops without committing, and a restart retries them.

With Kafka, dead letters go to the topic `<source>.dlq` (created with 1 partition if missing):

    key      b"<partition>:<offset>" (log offsets; b"-" for a row without a log position)
    value    the original bytes: the Kafka record's value for a source-level dead letter (an
             undecodable record, a tombstone has none, a record with a null key or time); for
             a late event, the row re-encoded as Avro single-object with the source's schema
             (its original format) when the writer knows the schema, else JSON
    headers  reason, source, partition, offset, original_size (bytes of the whole payload),
             truncated ("true"/"false"), payload_format ("original" | "avro-single-object" |
             "json"), and for a late event view and version (the view version it was late for)

A dead letter larger than the topic accepts (the topic's `max.message.bytes`, at most 1 MB by
the producer's default) is written truncated to fit, with `truncated: true` and its
`original_size`; a topic too small even for the key and headers stops the flow with an error.

A source-level dead letter is written once per log offset, whatever the number of replays,
view versions or restarts: `<warehouse>/<source>/_deadletter/_kafka_progress.json` (written
atomically, under an flock) holds per partition the ranges of log offsets whose source-level
dead letters (including events refused for every view, such as a poison timestamp) are
confirmed in the `.dlq` topic, and those are skipped (on an object-store warehouse, the same
JSON as numbered versions `_deadletter/_kafka_progress/<n>.json`, changed by conditional put
and retried on a conflict: connectors.objectstore.VersionedDocument). Late events are per
view version: a replay into a new version writes its own, marked by the `view` and `version`
headers.

Without Kafka, dead letters go to Parquet files under `<warehouse>/<source>/_deadletter/`
(the full payload, never truncated). Either way they are counted in the flow's metrics.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined, unused-ignore]

from connectors.avro import SingleObjectWriter
from connectors.envelope import DeadLetter, dead_letter_table
from connectors.errors import SchemaError
from connectors.objectstore import LocalStore, VersionedDocument, fsync_path, open_store
from connectors.segments import DEAD_LETTER_DIR, write_dead_letters
from flows.errors import DeadLetterError

_LOG = logging.getLogger("connectors.kafka")  # librdkafka's lines, rate-limited there
PROGRESS_FILE = "_kafka_progress.json"
PRODUCER_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
# Bytes of a one-record batch besides key, value and headers: the v2 batch header (61) and
# the record's framing varints, with a margin; a broker refusal halves the budget anyway.
FRAMING_BYTES = 61 + 40
HEADER_FRAMING_BYTES = 10
DELIVERY_TIMEOUT_S = 120.0  # librdkafka retries through a broker outage this long
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}  # refused by the producer or by the broker
_SIZE_RETRIES = 4


def dlq_topic(source: str) -> str:
    return f"{source}.dlq"


@dataclass(frozen=True, slots=True)
class _Letter:
    """A dead letter as a Kafka message, before it is fitted to the topic's size limit."""

    key: bytes
    payload: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    partition: int | None
    offset: int | None


class DeadLetterWriter:
    """Writes dead letters of one source to Kafka (`<source>.dlq`) or the warehouse.

    Args:
        schema: the source's Avro schema; late events are then re-encoded as Avro
            single-object payloads (their original format) instead of JSON.
    """

    def __init__(
        self,
        warehouse: str | Path,
        source: str,
        kafka_bootstrap: str | None,
        *,
        schema: Mapping[str, Any] | None = None,
    ) -> None:
        self._warehouse, self._source = warehouse, source
        self._encoder = SingleObjectWriter(schema) if schema is not None else None
        self._kafka: KafkaDeadLetters | None = None
        self._sent = sent_offsets(warehouse, source)
        if kafka_bootstrap:
            self._kafka = KafkaDeadLetters(kafka_bootstrap, dlq_topic(source))

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Write source-level dead letters; returns once every one is confirmed written.

        With Kafka, a letter at a log position already delivered (by an earlier run, replay,
        view version or another view) is skipped: one source-level letter per log offset.

        Raises:
            DeadLetterError: a dead letter was not confirmed delivered (the caller must not
                commit the offsets that produced it).
        """
        if self._kafka is None:
            self._write_files(letters)
            return
        fresh = self._sent.fresh(letters)
        if not fresh:
            return
        self._kafka.send([self._letter(d, ()) for d in fresh])
        self._sent.advance(fresh)

    def write_late(
        self, late: pa.Table, view: str, partition: int, version: int | None = None
    ) -> None:
        """Events too late for `view` (older than its retention behind the watermark).

        Raises:
            DeadLetterError: as `write`.
        """
        marks = (("view", view.encode()), ("version", str(version).encode()))
        letters = [self._late_letter(row, view, partition) for row in late.to_pylist()]
        if not letters:
            return
        if self._kafka is None:
            self._write_files(letters)
            return
        self._kafka.send([self._letter(d, marks, fmt) for d, fmt in letters])

    def _late_letter(
        self, row: dict[str, Any], view: str, partition: int
    ) -> tuple[DeadLetter, str]:
        payload, fmt = self._encode_row({k: v for k, v in row.items() if not k.startswith("_")})
        reason = (
            f"view {view!r}: event at offset {row['_offset']} is too late (older than the "
            "view's retention behind the partition's newest event time); raise "
            "allowed_lateness to keep such events"
        )
        return DeadLetter(reason, partition, int(row["_offset"]), payload), fmt

    def _encode_row(self, row: dict[str, Any]) -> tuple[bytes, str]:
        if self._encoder is not None:
            fields = {f["name"] for f in self._encoder.schema["fields"]}
            try:
                return self._encoder.encode({k: row.get(k) for k in fields}), "avro-single-object"
            except SchemaError:  # a transform changed a column: keep what can be kept
                pass
        return orjson.dumps(row, default=str), "json"

    def _letter(
        self, d: DeadLetter, marks: tuple[tuple[str, bytes], ...], fmt: str = "original"
    ) -> _Letter:
        key = b"-" if d.offset is None else f"{d.partition}:{d.offset}".encode()
        headers = (
            ("reason", d.reason.encode()),
            ("source", self._source.encode()),
            ("partition", str(d.partition).encode()),
            ("offset", str(d.offset).encode()),
            ("payload_format", fmt.encode()),
            *marks,
        )
        return _Letter(key, d.payload, headers, d.partition, d.offset)

    def _write_files(self, letters: Sequence[DeadLetter | tuple[DeadLetter, str]]) -> None:
        plain = [d[0] if isinstance(d, tuple) else d for d in letters]
        if plain:
            now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
            write_dead_letters(self._warehouse, self._source, dead_letter_table(plain, now_us))

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.close()


class KafkaDeadLetters:
    """The `.dlq` topic's producer: every message confirmed, oversized ones truncated to fit.

    The topic is looked up (and created) at the first letter, not before: a flow without dead
    letters makes no `.dlq` topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic, self._bootstrap = topic, bootstrap
        self._limit = 0
        self._started: Producer | None = None

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

    def send(self, letters: Sequence[_Letter]) -> None:
        """Deliver `letters`; returns once the broker confirmed every one.

        Raises:
            DeadLetterError: a letter cannot fit the topic, or was not delivered.
        """
        if not letters:
            return
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
            _create(admin, topic, timeout_s)
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


def _create(admin: AdminClient, topic: str, timeout_s: float) -> None:
    future = admin.create_topics([NewTopic(topic, 1, 1)])[topic]
    try:
        future.result(timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


class SentOffsets:
    """The log offsets whose source-level dead letters are confirmed in the `.dlq` topic, per
    partition, as sorted inclusive ranges: a JSON object {"<partition>": [[first, last], ...]}
    in one file, changed under an flock and replaced atomically (tmp, fsync, rename), so
    concurrent workers and processes never lose a mark. Exact offsets, not a high mark: letters
    of one partition may come in any order (shards, views)."""

    def __init__(self, path: Path | VersionedDocument) -> None:
        self._path = path

    def delivered(self) -> dict[int, list[tuple[int, int]]]:
        return self._read()[1]

    def _read(self) -> tuple[int, dict[int, list[tuple[int, int]]]]:
        try:
            version, data = (
                (0, self._path.read_bytes()) if isinstance(self._path, Path) else self._path.read()
            )
        except FileNotFoundError:
            return 0, {}
        raw: dict[str, list[list[int]]] = orjson.loads(data) if data else {}
        return version, {int(p): [(int(a), int(b)) for a, b in spans] for p, spans in raw.items()}

    def fresh(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """The letters not yet delivered (those without a log position always are)."""
        done = self.delivered() if letters else {}
        return [
            d
            for d in letters
            if d.partition is None
            or d.offset is None
            or not _within(done.get(d.partition), d.offset)
        ]

    def advance(self, letters: Sequence[DeadLetter]) -> None:
        """Mark the log positions of `letters` delivered."""
        marks: dict[int, list[int]] = {}
        for d in letters:
            if d.partition is not None and d.offset is not None:
                marks.setdefault(d.partition, []).append(d.offset)
        if not marks:
            return
        if isinstance(self._path, VersionedDocument):
            self._advance_versioned(self._path, marks)
            return
        path = self._path
        with self._locked():
            done = self.delivered()
            for p, offsets in marks.items():
                done[p] = _merged(done.get(p, []), offsets)
            data = orjson.dumps({str(p): spans for p, spans in sorted(done.items())})
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(data)
                fsync_path(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def _advance_versioned(self, doc: VersionedDocument, marks: dict[int, list[int]]) -> None:
        """Merge `marks` into the newest version; on a conflict, merge into the newer one."""
        while True:
            version, done = self._read()
            for p, offsets in marks.items():
                done[p] = _merged(done.get(p, []), offsets)
            if doc.commit(version, orjson.dumps({str(p): s for p, s in sorted(done.items())})):
                return

    @contextmanager
    def _locked(self) -> Iterator[None]:
        assert isinstance(self._path, Path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def sent_offsets(warehouse: str | Path, source: str) -> SentOffsets:
    """The source's record of dead letters confirmed in Kafka, in its warehouse."""
    store = open_store(warehouse)
    if isinstance(store, LocalStore):
        return SentOffsets(store.path(f"{source}/{DEAD_LETTER_DIR}/{PROGRESS_FILE}"))
    return SentOffsets(VersionedDocument(store, f"{source}/{DEAD_LETTER_DIR}/_kafka_progress"))


def _within(spans: list[tuple[int, int]] | None, offset: int) -> bool:
    if not spans:
        return False
    i = bisect.bisect_right(spans, (offset, math.inf)) - 1
    return i >= 0 and spans[i][0] <= offset <= spans[i][1]


def _merged(spans: list[tuple[int, int]], offsets: list[int]) -> list[tuple[int, int]]:
    """`spans` plus `offsets`, as sorted, disjoint, non-adjacent inclusive ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted([*spans, *((o, o) for o in offsets)]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


__all__ = ["DeadLetterWriter", "KafkaDeadLetters", "SentOffsets", "dlq_topic"]
