"""The Kafka tail against the real broker (scripts/kafka): every offset read exactly once,
bad payloads as dead letters at their offsets, the retention-gap rule."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.avro import MARKER, SchemaStore, arrow_schema, encode_single_object
from connectors.errors import ConnectorError, LogGapError, TopicMissingError
from connectors.kafka import AvroProducer
from connectors.kafka_admin import ensure_topic, list_partitions
from connectors.kafka_reader import KafkaBatch, KafkaLogReader
from connectors.partitioner import partition_for

Records = Callable[[int], list[dict[str, Any]]]
SOURCE_COLUMNS = ["user_id", "ts", "amount", "merchant", "channel", "is_fraud"]


def corrupt_payloads(schema: dict[str, Any], good: dict[str, Any]) -> list[bytes]:
    valid = encode_single_object(good, schema)
    return [
        b"",
        b"plain text",
        MARKER + bytes(8) + valid[10:],
        valid[:-3],
        valid[:10] + b"\x06\xff\xfe\xfd" + valid[14:],
    ]


def produce_raw(
    bootstrap: str,
    topic: str,
    items: list[tuple[str, bytes]],
) -> dict[int, list[tuple[int, bytes]]]:
    """Produce keyed raw values; their (offset, value) by partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    placed: dict[int, list[tuple[int, bytes]]] = {}

    def delivered(error: KafkaError | None, message: Message) -> None:
        assert error is None, error
        value = message.value()
        assert value is not None
        placed.setdefault(int(message.partition() or 0), []).append(
            (int(message.offset() or 0), value)
        )

    for key, value in items:
        producer.produce(topic, value=value, key=key.encode(), on_delivery=delivered)
    assert producer.flush(30) == 0
    return placed


def read_all(reader: KafkaLogReader, max_records: int = 64) -> list[KafkaBatch]:
    batches: list[KafkaBatch] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = reader.read_batch(max_records=max_records, timeout_s=0.2)
        batches.append(batch)
        if batch.at_end and batch.next_offset == reader.high_watermark():
            return batches
    raise AssertionError("the reader did not reach the end of the partition within 60 s")


def source_rows(table: pa.Table) -> list[dict[str, Any]]:
    ts = table.column("ts").cast(pa.int64())
    rows: list[dict[str, Any]] = table.select(SOURCE_COLUMNS).set_column(1, "ts", ts).to_pylist()
    return rows


@pytest.mark.kafka
def test_every_offset_is_read_once_and_bad_payloads_become_dead_letters(
    kafka_bootstrap: str,
    kafka_topic: Callable[[int], str],
    transaction_schema: dict[str, Any],
    transactions: Records,
) -> None:
    topic = kafka_topic(3)
    records = transactions(995)
    producer = AvroProducer(kafka_bootstrap, topic, transaction_schema)
    producer.produce(records[:500], key_field="user_id")
    producer.flush()
    bad = corrupt_payloads(transaction_schema, records[0])
    corrupt = produce_raw(kafka_bootstrap, topic, [(f"u{i}", p) for i, p in enumerate(bad)])
    producer.produce(records[500:], key_field="user_id")
    producer.flush()
    assert list_partitions(kafka_bootstrap, topic) == 3

    store, schema = SchemaStore(transaction_schema), arrow_schema(transaction_schema)
    started_us = time.time_ns() // 1000 - 600_000_000
    for p in range(3):
        with KafkaLogReader(
            kafka_bootstrap, topic, p, 0, store, schema, key_field="user_id"
        ) as reader:
            batches = read_all(reader)
            high = reader.high_watermark()
        events = pa.Table.from_batches([b.events for b in batches])
        failures = [f for b in batches for f in b.failures]
        offsets = events.column("_offset").to_pylist() + [f.offset for f in failures]
        assert sorted(offsets) == list(range(high)), "each offset exactly once"
        assert [(f.offset, f.payload) for f in failures] == corrupt.get(p, [])
        assert all(f.partition == p and f.reason for f in failures)
        assert source_rows(events) == [r for r in records if partition_for(r["user_id"], 3) == p]
        assert set(events.column("_partition").to_pylist()) <= {p}
        arrivals = events.column("_arrival").cast(pa.int64()).to_pylist()
        assert all(a > started_us for a in arrivals)
        assert events.schema.names == [*SOURCE_COLUMNS, "_offset", "_partition", "_arrival"]
    assert sum(len(v) for v in corrupt.values()) == 5


@pytest.mark.kafka
def test_reading_starts_at_the_given_offset_and_notices_new_records(
    kafka_bootstrap: str,
    kafka_topic: Callable[[int], str],
    transaction_schema: dict[str, Any],
    transactions: Records,
) -> None:
    topic = kafka_topic(1)
    records = transactions(20)
    producer = AvroProducer(kafka_bootstrap, topic, transaction_schema)
    producer.produce(records[:10], key_field="user_id")
    producer.flush()
    store, schema = SchemaStore(transaction_schema), arrow_schema(transaction_schema)
    with KafkaLogReader(kafka_bootstrap, topic, 0, 4, store, schema, key_field="user_id") as reader:
        first = read_all(reader)
        assert first[-1].at_end
        assert first[-1].next_offset == 10
        producer.produce(records[10:], key_field="user_id")
        producer.flush()
        second = read_all(reader)
    events = pa.Table.from_batches([b.events for b in first + second])
    assert events.column("_offset").to_pylist() == list(range(4, 20))
    assert source_rows(events) == records[4:]


@pytest.mark.kafka
def test_a_start_below_the_low_watermark_is_a_log_gap(
    kafka_bootstrap: str,
    kafka_topic: Callable[[int], str],
    transaction_schema: dict[str, Any],
    transactions: Records,
) -> None:
    topic = kafka_topic(1)
    producer = AvroProducer(kafka_bootstrap, topic, transaction_schema)
    producer.produce(transactions(10), key_field="user_id")
    producer.flush()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 6)]).values():
        future.result(timeout=15)
    store, schema = SchemaStore(transaction_schema), arrow_schema(transaction_schema)
    with pytest.raises(LogGapError, match=rf"topic '{topic}' partition 0: offsets \[2, 5\]"):
        KafkaLogReader(kafka_bootstrap, topic, 0, 2, store, schema, key_field="user_id")
    with KafkaLogReader(kafka_bootstrap, topic, 0, 6, store, schema, key_field="user_id") as reader:
        assert reader.low_watermark() == 6
        offsets = [o for b in read_all(reader) for o in b.events.column("_offset").to_pylist()]
    assert offsets == [6, 7, 8, 9]
    with pytest.raises(ConnectorError, match="past the partition's end 10"):
        KafkaLogReader(kafka_bootstrap, topic, 0, 11, store, schema, key_field="user_id")


@pytest.mark.kafka
def test_list_partitions_of_a_missing_topic(kafka_bootstrap: str) -> None:
    with pytest.raises(ConnectorError, match="topic 'no-such-topic-x' does not exist"):
        list_partitions(kafka_bootstrap, "no-such-topic-x", timeout_s=5)


@pytest.mark.kafka
def test_a_missing_topic_is_a_typed_error_that_ensure_topic_creates(kafka_bootstrap: str) -> None:
    topic = f"test-missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(TopicMissingError, match=f"topic '{topic}' does not exist"):
        list_partitions(kafka_bootstrap, topic, timeout_s=5)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        assert ensure_topic(kafka_bootstrap, topic, 3) is True
        assert list_partitions(kafka_bootstrap, topic) == 3
        assert ensure_topic(kafka_bootstrap, topic, 3) is False
        with pytest.raises(ConnectorError, match="has 3 partitions but its source declares 2"):
            ensure_topic(kafka_bootstrap, topic, 2)
    finally:
        admin.delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)


def test_ensure_topic_does_not_take_a_silent_broker_for_a_missing_topic() -> None:
    with pytest.raises(ConnectorError, match="did not answer") as caught:
        ensure_topic("127.0.0.1:1", "anything", 3, timeout_s=1)
    assert not isinstance(caught.value, TopicMissingError)


def test_list_partitions_gives_up_on_a_silent_broker() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectorError, match=r"Kafka at 127\.0\.0\.1:1 did not answer within 1"):
        list_partitions("127.0.0.1:1", "anything", timeout_s=1)
    assert time.monotonic() - started < 5


@pytest.mark.kafka
def test_a_tombstone_is_a_dead_letter_and_an_empty_partition_is_at_its_end(
    kafka_bootstrap: str,
    kafka_topic: Callable[[int], str],
    transaction_schema: dict[str, Any],
    transactions: Records,
) -> None:
    topic = kafka_topic(2)
    records = [r | {"user_id": "same-key"} for r in transactions(3)]
    partition = partition_for("same-key", 2)
    payloads = [encode_single_object(r, transaction_schema) for r in records]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for value in (payloads[0], payloads[1], None, payloads[2]):
        producer.produce(topic, value=value, key=b"same-key")
    assert producer.flush(30) == 0
    store, schema = SchemaStore(transaction_schema), arrow_schema(transaction_schema)
    with KafkaLogReader(
        kafka_bootstrap, topic, partition, 0, store, schema, key_field="user_id"
    ) as reader:
        batches = read_all(reader)
    events = pa.Table.from_batches([b.events for b in batches])
    assert events.column("_offset").to_pylist() == [0, 1, 3]
    assert source_rows(events) == records
    failures = [f for b in batches for f in b.failures]
    assert [(f.offset, f.payload) for f in failures] == [(2, None)]
    assert "tombstone" in failures[0].reason
    with KafkaLogReader(
        kafka_bootstrap, topic, 1 - partition, 0, store, schema, key_field="user_id"
    ) as empty:
        last = read_all(empty)[-1]
    assert (last.events.num_rows, last.next_offset, last.at_end) == (0, 0, True)
    assert last.events.schema.names == [*SOURCE_COLUMNS, "_offset", "_partition", "_arrival"]
