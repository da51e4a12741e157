"""`flows.archive` with the real broker (issue 14 items 2 and 9): it filled dead letters,
tombstones and transaction markers with null rows that the warehouse refused, and stayed stuck
on every rerun; it did not check the topic's partition count. Now every offset is accounted for
(a record, a dead letter, a hole or a gap), archive moves on, and the log read back from the
warehouse alone, or from the warehouse and Kafka, gives the same exact counts."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.avro import SingleObjectWriter
from connectors.deadletters import read_dead_letters
from connectors.kafka_admin import partition_watermarks
from connectors.segments import Warehouse
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.helpers import HOUR, SCHEMA_JSON, run_command

pytestmark = pytest.mark.kafka

DEFS = """
from flows.spec import FeatureView, Source, count, sum
src = Source(name={source!r}, schema="txn.avsc", key="user_id", timestamp="ts",
             partitions={partitions}, topic={topic!r})
totals = FeatureView(name="totals", source=src, features=[count(), sum("amount")])
"""
T0 = 1_790_000_000_000_000  # µs
SCHEMA = json.loads(SCHEMA_JSON)


def definitions(tmp_path: Path, topic: str, partitions: int) -> tuple[str, Path]:
    source = f"ar_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / f"defs{partitions}"
    folder.mkdir(parents=True)
    (folder / "txn.avsc").write_text(SCHEMA_JSON)
    path = folder / "features.py"
    path.write_text(DEFS.format(source=source, partitions=partitions, topic=topic))
    return source, path


def rows(n: int, start: int) -> list[dict[str, Any]]:
    return [
        {"user_id": f"u{(start + i) % 4}", "ts": T0 + (start + i) * 1_000_000, "amount": 1.0}
        for i in range(n)
    ]


def produce_log(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Good records, garbage, a tombstone, 3 committed and 1 aborted transaction; the events
    that count (in partition 0 of a 1-partition topic)."""
    writer = SingleObjectWriter(SCHEMA)
    plain = Producer({"bootstrap.servers": bootstrap})
    counted = rows(10, 0)
    for r in counted:
        plain.produce(topic, key=r["user_id"].encode(), value=writer.encode(r))
    plain.produce(topic, key=b"u1", value=b"\x00\x01 not avro at all")
    plain.produce(topic, key=b"u2", value=None)  # a tombstone
    assert plain.flush(30) == 0
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    tx.init_transactions(60)
    for i in range(4):
        batch = rows(5, 100 + 10 * i)
        tx.begin_transaction()
        for r in batch:
            tx.produce(topic, key=r["user_id"].encode(), value=writer.encode(r))
        if i == 2:
            tx.abort_transaction(30)  # not data: never applied
        else:
            tx.commit_transaction(30)
            counted += batch
    more = rows(10, 200)
    for r in more:
        plain.produce(topic, key=r["user_id"].encode(), value=writer.encode(r))
    assert plain.flush(30) == 0
    return counted + more


def run(features: Path, tmp_path: Path, *extra: str, state: str = "state") -> Any:
    return run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / state),
        "--until-caught-up",
        *extra,
    )


def counts(state: Path, keys: list[str]) -> dict[str, int]:
    with FeatureClient(state) as client:
        got = client.get_many("totals", keys, at=(T0 + 10 * HOUR) / 1e6)
    return {k: v["count"] for k, v in zip(keys, got, strict=True)}


def test_archive_moves_past_dead_letters_tombstones_and_transactions(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(1)
    source, features = definitions(tmp_path, topic, 1)
    counted = produce_log(kafka_bootstrap, topic)
    expected = dict(Counter(r["user_id"] for r in counted))
    keys = sorted(expected)
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    archive = [*common, "--kafka", kafka_bootstrap, "--max-age", "0"]

    first = run_command("flows.archive", *archive)
    again = run_command("flows.archive", *archive)  # not stuck: nothing left to do

    assert first.returncode == 0, first.stdout + first.stderr
    assert f"archived {len(counted)} records" in first.stdout
    assert again.returncode == 0, again.stdout + again.stderr
    assert "archived 0 records" in again.stdout
    wh = Warehouse(tmp_path / "wh")
    # Every offset up to the topic's end is covered: records, holes (dead letters, markers,
    # the aborted transaction) included.
    assert wh.next_offset(source, 0) == partition_watermarks(kafka_bootstrap, topic, 0)[1]
    letters = read_dead_letters(tmp_path / "wh", source).to_pylist()
    assert sorted((d["offset"], d["payload"]) for d in letters) == [
        (10, b"\x00\x01 not avro at all"),
        (11, None),
    ]

    from_warehouse = run(features, tmp_path, state="state-wh")  # no Kafka: segments only
    with_kafka = run(features, tmp_path, "--kafka", kafka_bootstrap, state="state-kafka")

    for result in (from_warehouse, with_kafka):
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"applied {len(counted)} events" in result.stdout
    assert counts(tmp_path / "state-wh", keys) == expected
    assert counts(tmp_path / "state-kafka", keys) == expected


def test_archive_refuses_a_topic_with_another_partition_count(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """With 3 it archived partitions 0-2 then failed unclearly; with 8 it would archive 0-3."""
    for actual, declared in ((3, 4), (8, 4)):
        topic = kafka_topic(actual)
        _, features = definitions(tmp_path / f"{actual}", topic, declared)
        result = run_command(
            "flows.archive",
            "--features",
            str(features),
            "--warehouse",
            str(tmp_path / f"wh{actual}"),
            "--kafka",
            kafka_bootstrap,
            "--max-age",
            "0",
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"topic {topic!r} has {actual} partitions but source" in result.stderr
        assert f"declares {declared}" in result.stderr
        assert not (tmp_path / f"wh{actual}").exists() or not list(
            (tmp_path / f"wh{actual}").rglob("*.parquet")
        )
