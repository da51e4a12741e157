"""The real Kafka broker of scripts/kafka: keyed messages land on partitions by key and come back
whole, in offset order per partition."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

pytestmark = pytest.mark.kafka

PARTITIONS = 3
COUNT = 30


class Record(NamedTuple):
    key: bytes
    value: bytes
    partition: int
    offset: int


def to_record(msg: Message) -> Record:
    assert msg.error() is None, msg.error()
    key, value, partition, offset = msg.key(), msg.value(), msg.partition(), msg.offset()
    assert key is not None
    assert value is not None
    assert partition is not None
    assert offset is not None
    return Record(key, value, partition, offset)


def produce(bootstrap: str, topic: str, messages: dict[bytes, bytes]) -> dict[bytes, Record]:
    """Produces value -> key pairs in order; returns each value's delivery report."""
    delivered: dict[bytes, Record] = {}

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        record = to_record(msg)
        delivered[record.value] = record

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value, key in messages.items():
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    return delivered


def consume_all(bootstrap: str, topic: str, count: int) -> list[Record]:
    """Reads every partition from its beginning until `count` records arrived (30 s at most)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    received: list[Record] = []
    deadline = time.monotonic() + 30
    try:
        while len(received) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                received.append(to_record(msg))
    finally:
        consumer.close()
    return received


def test_keyed_messages_come_back_in_partition_order(
    kafka_bootstrap: str, kafka_topic: Callable[[int], str]
) -> None:
    topic = kafka_topic(PARTITIONS)
    sent = {f"value-{i:02d}".encode(): f"key-{i % 10}".encode() for i in range(COUNT)}

    delivered = produce(kafka_bootstrap, topic, sent)
    received = consume_all(kafka_bootstrap, topic, COUNT)

    assert len(delivered) == COUNT
    assert sorted(r.value for r in received) == sorted(sent)
    assert all(r.key == sent[r.value] and r == delivered[r.value] for r in received)
    by_partition: dict[int, list[Record]] = defaultdict(list)
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for r in received:
        by_partition[r.partition].append(r)
        partitions_of_key[r.key].add(r.partition)
    assert len(by_partition) > 1, "the keys should spread over the partitions"
    assert all(len(p) == 1 for p in partitions_of_key.values()), "one key, one partition"
    for records in by_partition.values():
        assert [r.offset for r in records] == list(range(len(records)))
        values = [r.value for r in records]
        assert values == sorted(values), "a partition keeps the order messages were produced in"
