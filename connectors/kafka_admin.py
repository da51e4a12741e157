"""Topics and offsets, not records: how many partitions a topic has, making sure a source's topic
exists with its partition count, a partition's watermarks and the offset at a time, and the
largest message a dead-letter topic accepts (connectors.kafka_deadletters). A topic that does
not exist is a TopicMissingError (the broker's UNKNOWN_TOPIC_OR_PART), told apart by its code.

Every consumer here (and the log reader's, connectors.kafka_reader) assigns its partitions
itself and never joins or commits to a consumer group: offsets are the log's own.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined, unused-ignore]

from connectors.errors import ConnectorError, DeadLetterError, TopicMissingError
from connectors.kafka_logging import KAFKA_LOG

__all__ = [
    "MISSING_TOPIC",
    "consumer_config",
    "ensure_topic",
    "fetch_watermarks",
    "list_partitions",
    "offset_at_time",
    "partition_watermarks",
    "topic_message_limit",
]

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
MISSING_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
PRODUCER_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes


def consumer_config(bootstrap: str) -> dict[str, Any]:
    """The settings of a consumer that reads assigned partitions and never commits."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": "featureflow-log-reader",  # required by librdkafka; never joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "error",  # a vanished offset is a gap to report, never a skip
        "logger": KAFKA_LOG,
    }


def list_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """The number of partitions of `topic`.

    Raises:
        TopicMissingError: the topic does not exist.
        ConnectorError: the broker does not answer within `timeout_s`, or reports another
            error for the topic.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": KAFKA_LOG}
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
    if found is None or (found.error is not None and found.error.code() in MISSING_TOPIC):
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
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": KAFKA_LOG}
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


def partition_watermarks(
    bootstrap: str, topic: str, partition: int, timeout_s: float = 10.0
) -> tuple[int, int]:
    """(low, high) watermarks of one partition, without reading it.

    Raises:
        ConnectorError: the broker does not answer, or the topic or partition does not exist.
    """
    consumer = Consumer(consumer_config(bootstrap))
    try:
        return fetch_watermarks(consumer, topic, partition, timeout_s)
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
    consumer = Consumer(consumer_config(bootstrap))
    try:
        (found,) = consumer.offsets_for_times(
            [TopicPartition(topic, partition, at_ms)], timeout=timeout_s
        )
        if found.error is None and found.offset >= 0:
            return int(found.offset)
        if found.error is None:  # no message that late
            return fetch_watermarks(consumer, topic, partition, timeout_s)[1]
        error = found.error
    except KafkaException as exc:
        error = exc.args[0]
    finally:
        consumer.close()
    raise ConnectorError(
        f"topic {topic!r} partition {partition}: cannot find the offset at time {at_ms} ms "
        f"({error.str()}); check that the broker runs and the topic exists"
    )


def fetch_watermarks(
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


def topic_message_limit(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """The largest message `topic` accepts (its max.message.bytes, at most the producer's
    default); the topic is created (1 partition) if it does not exist.

    Raises:
        DeadLetterError: the broker does not answer, or the topic cannot be created.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": KAFKA_LOG}
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
