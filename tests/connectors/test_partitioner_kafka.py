"""Our partitioner against the real thing: librdkafka's murmur2_random on a real broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, Message, Producer

from connectors.partitioner import partition_for

pytestmark = pytest.mark.kafka


def test_keys_land_in_the_partition_we_compute(
    kafka_bootstrap: str, kafka_topic: Callable[[int], str]
) -> None:
    topic = kafka_topic(7)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    landed: dict[str, int] = {}

    def delivered(error: KafkaError | None, message: Message) -> None:
        assert error is None, error
        key = message.key()
        assert isinstance(key, bytes)
        landed[key.decode()] = int(message.partition() or 0)

    keys = [f"user-{i}-ü" if i % 10 == 0 else f"user-{i}" for i in range(200)]
    for key in keys:
        producer.produce(topic, value=b"x", key=key.encode(), on_delivery=delivered)
    assert producer.flush(30) == 0
    assert set(landed) == set(keys)
    assert len(set(landed.values())) == 7  # all partitions used: the check is not vacuous
    assert {k: landed[k] for k in keys} == {k: partition_for(k, 7) for k in keys}
