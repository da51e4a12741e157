"""Dead letters with the real broker (issue 14 items 4, 5, 9): a 1 MB undecodable record, a
`.dlq` topic that refuses writes, replays that must not re-send, late events in their original
format. Each test uses a source of its own, so its `<source>.dlq` topic is its own too."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined, unused-ignore]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from connectors.avro import SchemaStore
from connectors.kafka import AvroProducer
from connectors.kafka_admin import partition_watermarks
from flows.runplan import read_progress
from state.store import ViewStore
from tests.conftest import TopicFactory
from tests.connectors.avro_oracle import decode_one
from tests.helpers import HOUR, SCHEMA_JSON, run_command

pytestmark = pytest.mark.kafka

DEFS = """
from flows.spec import FeatureView, Source, count, sum
src = Source(name={source!r}, schema="txn.avsc", key="user_id", timestamp="ts",
             partitions={partitions}, topic={topic!r})
spend = FeatureView(name="spend", source=src, features=[
    count(window="1h"), sum("amount", window="1h")])
"""
T0 = 1_790_000_000_000_000  # µs


def setup_source(tmp_path: Path, topic: str, partitions: int) -> tuple[str, Path]:
    source = f"dl_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "defs"
    folder.mkdir()
    (folder / "txn.avsc").write_text(SCHEMA_JSON)
    path = folder / "features.py"
    path.write_text(DEFS.format(source=source, partitions=partitions, topic=topic))
    return source, path


def events(n: int, t0: int = T0) -> list[dict[str, Any]]:
    return [
        {"user_id": f"u{i % 5}", "ts": t0 + i * 1_000_000, "amount": 1.0, "channel": "web"}
        for i in range(n)
    ]


def produce_events(bootstrap: str, topic: str, rows: list[dict[str, Any]]) -> None:
    import json

    producer = AvroProducer(bootstrap, topic, json.loads(SCHEMA_JSON))
    producer.produce(rows, key_field="user_id")
    producer.flush()


def produce_raw(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"u1") -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "message.max.bytes": 2_000_000,
        }
    )
    for value in values:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message of partition 0 of `topic` (the `.dlq` topics have one partition)."""
    _, high = partition_watermarks(bootstrap, topic, 0)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages: list[Any] = []
    try:
        while len(messages) < high:
            batch = consumer.consume(500, timeout=10)
            assert batch, f"read {len(messages)} of {high} messages of {topic!r}"
            messages += [m for m in batch if m.error() is None]
    finally:
        consumer.close()
    return messages


def run_flow(features: Path, tmp_path: Path, bootstrap: str, state: str = "state") -> Any:
    return run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / state),
        "--kafka",
        bootstrap,
        "--until-caught-up",
    )


def headers(message: Any) -> dict[str, bytes]:
    return dict(message.headers() or [])


def create_dlq(bootstrap: str, source: str, max_bytes: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(f"{source}.dlq", 1, 1, config={"max.message.bytes": str(max_bytes)})
    admin.create_topics([topic])[topic.topic].result(15)


def test_a_1mb_undecodable_record_is_a_truncated_dead_letter(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 4: the dead-letter produce raised MSG_SIZE_TOO_LARGE, the flow crashed and
    every restart hit the same record."""
    topic = kafka_topic(2)
    source, features = setup_source(tmp_path, topic, 2)
    produce_events(kafka_bootstrap, topic, events(10))
    huge = b"\x00not avro" + bytes(999_950)
    produce_raw(kafka_bootstrap, topic, [huge])
    produce_events(kafka_bootstrap, topic, events(10, T0 + HOUR))

    result = run_flow(features, tmp_path, kafka_bootstrap)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "applied 20 events" in result.stdout
    assert "dead letters 1" in result.stdout
    (letter,) = read_topic(kafka_bootstrap, f"{source}.dlq")
    h = headers(letter)
    assert h["truncated"] == b"true"
    assert h["original_size"] == str(len(huge)).encode()
    assert b"single-object marker" in h["reason"]
    assert 0 < len(letter.value()) < 1_000_000
    assert huge.startswith(letter.value())
    assert letter.key() == f"{int(h['partition'])}:{int(h['offset'])}".encode()


def test_a_dlq_topic_with_small_messages_gets_every_letter_truncated(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 5: 20 dead letters counted, 0 in a `.dlq` with a small max.message.bytes,
    nothing logged."""
    topic = kafka_topic(1)
    source, features = setup_source(tmp_path, topic, 1)
    create_dlq(kafka_bootstrap, source, 2000)
    bad = [b"\xc3\x01" + bytes([i]) * 3000 for i in range(20)]
    produce_raw(kafka_bootstrap, topic, bad)
    produce_events(kafka_bootstrap, topic, events(5))

    result = run_flow(features, tmp_path, kafka_bootstrap)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "dead letters 20" in result.stdout
    letters = read_topic(kafka_bootstrap, f"{source}.dlq")
    assert sorted(m.key() for m in letters) == sorted(f"0:{i}".encode() for i in range(20))
    for m in letters:
        h = headers(m)
        assert h["truncated"] == b"true"
        assert h["original_size"] == b"3002"
        assert bad[int(h["offset"])].startswith(m.value())


def test_a_dlq_topic_too_small_for_a_letter_stops_the_flow_before_the_commit(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A dead letter that cannot be written stops the flow loudly, and the offsets that
    produced it are not committed: once the topic is fixed, a rerun writes it."""
    topic = kafka_topic(1)
    source, features = setup_source(tmp_path, topic, 1)
    create_dlq(kafka_bootstrap, source, 200)  # less than a letter's headers
    produce_events(kafka_bootstrap, topic, events(5))
    produce_raw(kafka_bootstrap, topic, [b"garbage"])  # offset 5
    produce_events(kafka_bootstrap, topic, events(5, T0 + HOUR))

    failed = run_flow(features, tmp_path, kafka_bootstrap)

    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "max.message.bytes" in failed.stderr
    assert "Traceback" not in failed.stderr
    store = ViewStore(tmp_path / "state")
    (version,) = store.versions("spend")
    assert read_progress(store, "spend", version, 0).applied_offset < 5  # not committed
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    entry = ConfigEntry("max.message.bytes", "100000", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", f"{source}.dlq", incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(15)

    rerun = run_flow(features, tmp_path, kafka_bootstrap)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    (letter,) = read_topic(kafka_bootstrap, f"{source}.dlq")
    assert letter.key() == b"0:5"
    assert letter.value() == b"garbage"
    assert headers(letter)["truncated"] == b"false"


def test_replays_and_new_states_write_each_dead_letter_once(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 5: every replay or new state re-sent every dead letter to the shared
    `.dlq` (40,000 records for 10,000 offsets)."""
    topic = kafka_topic(2)
    source, features = setup_source(tmp_path, topic, 2)
    produce_events(kafka_bootstrap, topic, events(30))
    produce_raw(kafka_bootstrap, topic, [b"bad-1", b"bad-2"], key=b"u1")
    produce_raw(kafka_bootstrap, topic, [b"bad-3"], key=b"u2")

    for state in ("state-a", "state-b", "state-c"):
        result = run_flow(features, tmp_path, kafka_bootstrap, state=state)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "dead letters 3" in result.stdout  # read and counted each time
    replay = run_command(
        "flows.replay",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "state-a"),
        "--kafka",
        kafka_bootstrap,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr

    letters = read_topic(kafka_bootstrap, f"{source}.dlq")
    assert sorted(m.value() for m in letters) == [b"bad-1", b"bad-2", b"bad-3"]
    assert len({m.key() for m in letters}) == 3


def test_late_events_are_dead_letters_in_their_original_avro_format(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 9: late-event dead-letter payloads were JSON, not the original bytes."""
    import json

    topic = kafka_topic(1)
    source, features = setup_source(tmp_path, topic, 1)
    late = {"user_id": "u1", "ts": T0 - 24 * HOUR, "amount": 7.5, "channel": "pos"}
    produce_events(kafka_bootstrap, topic, [*events(5), late])

    result = run_flow(features, tmp_path, kafka_bootstrap)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "late 1" in result.stdout
    (letter,) = read_topic(kafka_bootstrap, f"{source}.dlq")
    h = headers(letter)
    assert h["view"] == b"spend"
    assert int(h["version"]) >= 1
    assert h["payload_format"] == b"avro-single-object"
    assert letter.key() == b"0:5"
    assert decode_one(SchemaStore(json.loads(SCHEMA_JSON)), letter.value()) == late
