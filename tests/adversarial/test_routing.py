"""Issue 14 item 1: the flow is correct whatever partitioner or Kafka key a producer used: the
record's key field decides which view shard holds it, so every event is readable through the
client, exactly once, also through kill -9 of the flow."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Producer

from connectors.avro import SingleObjectWriter
from connectors.kafka import AvroProducer
from connectors.partitioner import partition_for
from flows.spec import load_definitions
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.e2e.test_crash import KillPoint, compare_states, crash_and_recover
from tests.e2e.test_e2e_kafka import read_topic_log
from tests.helpers import DAY, MINUTE, make_events, run_command, write_definitions
from tests.oracle import mismatches, oracle_values

pytestmark = pytest.mark.kafka
PARTITIONS = 3


def produce_anyhow(bootstrap: str, topic: str, schema: dict[str, object], events: pa.Table) -> None:
    """Most events with librdkafka's default partitioner (consistent_random, CRC32), some with
    a null Kafka key, some with a Kafka key that is not the record's key."""
    rows = events.to_pylist()
    plain = AvroProducer(bootstrap, topic, schema, config={"partitioner": "consistent_random"})
    plain.produce(rows[: len(rows) - 100], key_field="user_id")
    plain.flush()
    raw = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    writer = SingleObjectWriter(schema)
    for i, row in enumerate(rows[len(rows) - 100 :]):
        key = None if i % 2 else f"someone-else-{i}".encode()
        raw.produce(topic, key=key, value=writer.encode(row))
    assert raw.flush(30) == 0


def misplaced(bootstrap: str, topic: str, events: pa.Table) -> int:
    """How many records sit in another partition than their key's (the case under test)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    wrong = seen = 0
    keys = events.column("user_id").to_pylist()
    writer_keys = Counter(keys)
    while seen < events.num_rows and (batch := consumer.consume(1000, timeout=5)):
        for m in batch:
            if m.error() is None:
                seen += 1
                # the record's key field is in the value; count by the Kafka key when it is one
                k = (m.key() or b"").decode()
                wrong += k not in writer_keys or partition_for(k, PARTITIONS) != m.partition()
    consumer.close()
    return wrong


@pytest.mark.parametrize("workers", [1, 2])
def test_any_partitioner_gives_every_event_to_its_key(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, workers: int
) -> None:
    topic = kafka_topic(PARTITIONS)
    features = write_definitions(tmp_path / "defs", PARTITIONS, topic)
    defs = load_definitions(features)
    events = make_events(3000, 60, seed=14)
    produce_anyhow(kafka_bootstrap, topic, defs.sources["txns"].avro_schema(), events)
    assert misplaced(kafka_bootstrap, topic, events) > 1000  # most records are off their shard

    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp_path / "wh")),
        *("--state", str(tmp_path / "state"), "--kafka", kafka_bootstrap),
        *("--until-caught-up", "--workers", str(workers)),
    )
    assert result.returncode == 0, result.stderr
    assert "applied 3,000 events" in result.stdout, result.stdout
    assert "dead letters 0" in result.stdout, result.stdout

    schema = defs.sources["txns"].avro_schema()
    log = read_topic_log(kafka_bootstrap, topic, schema, PARTITIONS, tmp_path / "wh")
    assert log.num_rows == events.num_rows
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 3 * MINUTE
    spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
    with FeatureClient(tmp_path / "state") as client:
        counts = [row["count"] for row in client.get_many("spend", keys, at=t / 1e6)]
        assert sum(counts) == events.num_rows  # every event readable, none twice
        for name in ("spend", "channels"):
            expected = oracle_values(defs.layouts[name], log, spine)
            got = client.get_many(name, keys, at=t / 1e6)
            assert mismatches(defs.layouts[name], expected, got) == []


def test_any_partitioner_survives_kill_9(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(PARTITIONS)
    features = write_definitions(tmp_path / "defs", PARTITIONS, topic)
    events = make_events(20_000, 300, seed=41)
    schema = load_definitions(features).sources["txns"].avro_schema()
    producer = AvroProducer(kafka_bootstrap, topic, schema, config={"partitioner": "random"})
    producer.produce(events.to_pylist(), key_field="user_id")
    producer.flush()
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    common += ["--kafka", kafka_bootstrap, "--until-caught-up", "--batch-rows", "2000"]

    ref = run_command("flows.run", *common, "--state", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    assert "applied 20,000 events" in ref.stdout, ref.stdout

    crashed = tmp_path / "crashed"
    points = [KillPoint(0.0, commits=c) for c in (1, 3, 2, 5, 1)] + [KillPoint(0.3)]
    crash_and_recover([*common, "--state", str(crashed)], crashed, points, tmp_path / "logs")
    compare_states(features, tmp_path / "ref", crashed, events)


def test_a_far_future_event_on_kafka_is_a_dead_letter_not_a_watermark(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 3 on the real broker: an event 50 years ahead of its Kafka message time,
    then normal ones on the same partition: every normal one is applied, none is late."""
    topic = kafka_topic(1)
    features = write_definitions(tmp_path / "defs", 1, topic)
    defs = load_definitions(features)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(2000, 20, seed=3, start_us=int(time.time() * 1e6) - 4 * DAY)
    future = dict(events.slice(0, 1).to_pylist()[0])
    future["ts"] = datetime.fromtimestamp(time.time() + 50 * 365 * 86400, tz=UTC)
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    producer.produce([future, *events.to_pylist()], key_field="user_id")
    producer.flush()

    result = run_command(
        "flows.run",
        *("--features", str(features), "--warehouse", str(tmp_path / "wh")),
        *("--state", str(tmp_path / "state"), "--kafka", kafka_bootstrap, "--until-caught-up"),
    )
    assert result.returncode == 0, result.stderr
    for part in ("applied 2,000 events", "late 0;", "dead letters 1"):
        assert part in result.stdout, result.stdout
    log = read_topic_log(kafka_bootstrap, topic, schema, 1, tmp_path / "wh")
    log = log.filter(pc.less(log.column("ts"), pa.scalar(future["ts"], log.column("ts").type)))
    keys = sorted(set(events.column("user_id").to_pylist()))
    t = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 3 * MINUTE
    spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
    with FeatureClient(tmp_path / "state") as client:
        for name in ("spend", "channels"):
            expected = oracle_values(defs.layouts[name], log, spine)
            got = client.get_many(name, keys, at=t / 1e6)
            assert mismatches(defs.layouts[name], expected, got) == []
