"""End to end with the real broker: Avro events produced to Kafka, half archived into segments,
then `flows.run --kafka` applies segments and the Kafka tail; a client in another process than
the writer sees the oracle's values; bad payloads land in the dead-letter topic."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.avro import SchemaStore, arrow_schema
from connectors.kafka import AvroProducer
from connectors.kafka_reader import KafkaLogReader
from connectors.segments import Warehouse
from flows.spec import load_definitions
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.helpers import MINUTE, make_events, run_command, write_definitions
from tests.oracle import mismatches, oracle_values

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, schema: dict[str, object], events: pa.Table) -> None:
    producer = AvroProducer(bootstrap, topic, schema)
    producer.produce(events.to_pylist(), key_field="user_id")
    producer.flush()


def read_topic_log(
    bootstrap: str, topic: str, schema: dict[str, object], partitions: int, warehouse: Path
) -> pa.Table:
    """The whole log as the flow sees it: segments, then Kafka after the last archived offset."""
    wh = Warehouse(warehouse)
    tables = []
    for p in range(partitions):
        tables += [pa.Table.from_batches([b]) for b in wh.read("txns", p)]
        reader = KafkaLogReader(
            bootstrap,
            topic,
            p,
            wh.next_offset("txns", p),
            SchemaStore(schema),
            arrow_schema(schema),
            key_field="user_id",
        )
        try:
            while not (batch := reader.read_batch(5000)).at_end or batch.events.num_rows:
                tables.append(pa.Table.from_batches([batch.events]))
        finally:
            reader.close()
    return pa.concat_tables(t.select(tables[0].column_names) for t in tables)


def test_segments_then_kafka_equals_oracle(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(3)
    features = write_definitions(tmp_path / "defs", partitions=3, topic=topic)
    defs = load_definitions(features)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(6000, 40, seed=8)
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--kafka",
        kafka_bootstrap,
    ]
    produce(kafka_bootstrap, topic, schema, events.slice(0, 3000))
    archived = run_command("flows.archive", *common, "--max-age", "0")
    assert archived.returncode == 0, archived.stderr
    assert "archived 3,000 records" in archived.stdout
    produce(kafka_bootstrap, topic, schema, events.slice(3000))
    bad = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for i in range(4):
        bad.produce(topic, key=b"user1", value=b"\xc3\x01garbage-" + topic.encode() + bytes([i]))
    bad.flush(10)

    result = run_command(
        "flows.run", *common, "--state", str(tmp_path / "state"), "--until-caught-up"
    )
    assert result.returncode == 0, result.stderr
    assert "applied 6,000 events" in result.stdout
    assert "dead letters 4" in result.stdout

    log = read_topic_log(kafka_bootstrap, topic, schema, 3, tmp_path / "wh")
    assert log.num_rows == 6000
    offsets = {
        (p, o)
        for p, o in zip(
            log.column("_partition").to_pylist(), log.column("_offset").to_pylist(), strict=True
        )
    }
    assert len(offsets) == 6000  # every record exactly once across segments and Kafka
    newest = int(log.column("ts").cast(pa.int64()).to_numpy().max())
    keys = sorted(set(log.column("user_id").to_pylist()))
    with FeatureClient(tmp_path / "state") as client:
        for name in ("spend", "channels"):
            t = newest + 3 * MINUTE
            spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
            expected = oracle_values(defs.layouts[name], log, spine)
            got = client.get_many(name, keys, at=t / 1e6)
            assert mismatches(defs.layouts[name], expected, got) == []

    dlq = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    dlq.assign([TopicPartition("txns.dlq", 0, 0)])
    letters = []
    while batch := dlq.consume(500, timeout=5):
        letters += [m for m in batch if m.error() is None and topic.encode() in (m.value() or b"")]
    dlq.close()
    assert len(letters) == 4  # the dead-letter topic is shared by runs: count only ours
    for m in letters:
        headers = dict(m.headers() or [])
        assert b"fingerprint" in headers["reason"]  # names the cause: an unknown writer schema
        assert int(headers["partition"]) in range(3)
        assert int(headers["offset"]) >= 0


def test_topic_partition_count_must_match_the_source(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Keys are placed by murmur2 modulo the partition count: a mismatch is refused, a missing
    topic is created with the source's count."""
    topic = kafka_topic(2)
    features = write_definitions(tmp_path / "defs", partitions=3, topic=topic)
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "st"),
        "--kafka",
        kafka_bootstrap,
        "--until-caught-up",
    ]
    result = run_command("flows.run", *common)
    assert result.returncode == 2
    assert f"topic {topic!r} has 2 partitions but its source declares 3" in result.stderr
    fresh = f"{topic}-new"
    features = write_definitions(tmp_path / "defs2", partitions=3, topic=fresh)
    result = run_command("flows.run", "--features", str(features), *common[2:])
    assert result.returncode == 0, result.stderr
    assert f"created topic {fresh!r} with 3 partitions" in result.stdout
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": kafka_bootstrap}).delete_topics([fresh])
