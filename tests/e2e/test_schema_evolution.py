"""Schema evolution end to end: segments ingested with schema v1, then v1 and v2 Avro records
interleaved on Kafka with corrupt bytes among them, read by a source whose schema is v2; every
offset is applied once, old records get the new field's default, and an incompatible v3 is
refused with the field and the rule named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from connectors.kafka import AvroProducer
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.helpers import HOUR, run_command

V1: dict[str, Any] = {
    "type": "record",
    "name": "Click",
    "fields": [
        {"name": "user", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "amount", "type": "int"},
        {"name": "legacy", "type": ["null", "string"], "default": None},
    ],
}
V2: dict[str, Any] = {
    "type": "record",
    "name": "Click",
    "fields": [
        {"name": "user", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "amount", "type": "long"},  # promoted int -> long
        {"name": "page", "type": "string", "default": "home"},  # added with a default
    ],
}  # "legacy" removed
V3_BAD: dict[str, Any] = {
    **V2,
    "fields": [*V2["fields"][:3], {"name": "page", "type": "int", "default": 0}],
}

DEFS = """
from flows.spec import FeatureView, Source, count, last, sum
clicks = Source(name="clicks", schema={schema!r}, key="user", timestamp="ts", partitions=2,
                topic={topic!r}, previous_schemas={previous!r})
activity = FeatureView(name="activity", source=clicks, features=[
    count(), sum("amount"), last({last!r}), count(window="1h")])
"""


def definitions(
    path: Path, schema: dict[str, Any], topic: str, previous: list[dict[str, Any]]
) -> Path:
    last = "page" if any(f["name"] == "page" for f in schema["fields"]) else "legacy"
    path.write_text(DEFS.format(schema=schema, topic=topic, previous=previous, last=last))
    return path


def test_v1_segments_then_mixed_kafka_records(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(2)
    base = 1_790_000_000_000  # ms
    wh = ["--warehouse", str(tmp_path / "wh")]
    # 1. history ingested while the source was still at v1
    v1_defs = definitions(tmp_path / "v1.py", V1, topic, [])
    history = pa.table(
        {
            "user": ["a", "b", "a"],
            "ts": pa.array([base, base + 1, base + 2], pa.timestamp("ms", tz="UTC")),
            "amount": pa.array([1, 2, 3], pa.int32()),
            "legacy": ["x", None, "y"],
        }
    )
    pq.write_table(history, tmp_path / "history.parquet")
    result = run_command(
        "flows.ingest", "--features", str(v1_defs), *wh, str(tmp_path / "history.parquet")
    )
    assert result.returncode == 0, result.stderr

    # 2. then the topic: v1 and v2 records interleaved, corrupt bytes among them
    v1_producer = AvroProducer(kafka_bootstrap, topic, V1)
    v2_producer = AvroProducer(kafka_bootstrap, topic, V2)
    raw = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    produced = 0
    for i in range(300):
        ts = base + 10 + i * 1000
        if i % 3 == 0:
            v1_producer.produce(
                [{"user": f"u{i % 7}", "ts": ts, "amount": i, "legacy": "z"}], key_field="user"
            )
        else:
            v2_producer.produce(
                [{"user": f"u{i % 7}", "ts": ts, "amount": i, "page": f"p{i}"}], key_field="user"
            )
        produced += 1
        if i % 50 == 0:
            raw.produce(topic, key=f"u{i % 7}".encode(), value=b"\x00\x01not avro")
    v1_producer.flush()
    v2_producer.flush()
    raw.flush(10)
    v2_defs = definitions(tmp_path / "v2.py", V2, topic, [V1])
    # 3. the source moves to v2: the v1 segments and v1 records resolve to it
    state = tmp_path / "state"
    result = run_command(
        "flows.run",
        "--features",
        str(v2_defs),
        *wh,
        "--kafka",
        kafka_bootstrap,
        "--state",
        str(state),
        "--until-caught-up",
    )
    assert result.returncode == 0, result.stderr
    assert f"applied {3 + produced} events" in result.stdout  # every offset once
    assert "dead letters 6" in result.stdout
    with FeatureClient(state) as client:
        at = (base + 400_000) / 1000 + HOUR / 1e6
        got = client.get_many("activity", ["a", "b", *(f"u{k}" for k in range(7))], at=at)
    assert got[0] == {"count": 2, "amount_sum": 4, "page_last": "home", "count_1h": 0}
    assert got[1]["page_last"] == "home"  # v1 history: the field added in v2 has its default
    for k in range(7):
        mine = [i for i in range(300) if i % 7 == k]
        last = mine[-1]
        assert got[2 + k]["count"] == len(mine)
        assert got[2 + k]["amount_sum"] == sum(mine)
        assert got[2 + k]["page_last"] == ("home" if last % 3 == 0 else f"p{last}")


def test_incompatible_schema_is_refused(tmp_path: Path) -> None:
    topic = "unused"
    v2_defs = definitions(tmp_path / "v2.py", V2, topic, [V1])
    rows = pa.table(
        {
            "user": ["a"],
            "ts": pa.array([1], pa.timestamp("ms", tz="UTC")),
            "amount": pa.array([1], pa.int64()),
            "page": ["x"],
        }
    )
    pq.write_table(rows, tmp_path / "rows.parquet")
    wh = ["--warehouse", str(tmp_path / "wh")]
    assert (
        run_command(
            "flows.ingest", "--features", str(v2_defs), *wh, str(tmp_path / "rows.parquet")
        ).returncode
        == 0
    )
    bad_defs = definitions(tmp_path / "v3.py", V3_BAD, topic, [])
    result = run_command(
        "flows.run",
        "--features",
        str(bad_defs),
        *wh,
        "--state",
        str(tmp_path / "st"),
        "--until-caught-up",
    )
    assert result.returncode == 2
    assert "'page'" in result.stderr  # names the field and the rule it breaks
    assert "promotion" in result.stderr
    json.dumps(V3_BAD)  # the fixture itself is valid JSON


pytestmark = pytest.mark.kafka


V2_MICROS: dict[str, Any] = {
    **V2,
    "fields": [
        V2["fields"][0],
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        *V2["fields"][2:],
    ],
}  # the same CRC-64-AVRO fingerprint as V2: the canonical form drops logical types


def run_flow(defs: Path, tmp_path: Path, kafka: str) -> Any:
    return run_command(
        "flows.run",
        "--features",
        str(defs),
        "--warehouse",
        str(tmp_path / "wh"),
        "--kafka",
        kafka,
        "--state",
        str(tmp_path / "state"),
        "--until-caught-up",
    )


def test_writer_that_changed_the_timestamp_unit_is_refused(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Issue 14 item 8: records written with timestamp-millis read as -micros land in 1970."""
    topic = kafka_topic(2)
    producer = AvroProducer(kafka_bootstrap, topic, V2)  # a millis writer
    producer.produce(
        [{"user": "a", "ts": 1_790_000_000_000_000, "amount": 1, "page": "p"}], key_field="user"
    )
    producer.flush()
    defs = definitions(tmp_path / "micros.py", V2_MICROS, topic, [V2])
    result = run_flow(defs, tmp_path, kafka_bootstrap)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'ts'" in result.stderr
    assert "timestamp-millis" in result.stderr
    assert "timestamp-micros" in result.stderr
    assert "applied" not in result.stdout  # refused at load, before any event


def test_warehouse_schema_with_another_unit_is_refused(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The log was archived with the millis writer; a source that now says micros (same
    fingerprint) is refused instead of reading the segments' schema as its own."""
    topic = kafka_topic(2)
    producer = AvroProducer(kafka_bootstrap, topic, V2)
    producer.produce(
        [
            {"user": f"u{i}", "ts": 1_790_000_000_000_000 + i, "amount": i, "page": "p"}
            for i in range(9)
        ],
        key_field="user",
    )
    producer.flush()
    millis = definitions(tmp_path / "millis.py", V2, topic, [])
    common = ["--warehouse", str(tmp_path / "wh"), "--kafka", kafka_bootstrap]
    archived = run_command("flows.archive", "--features", str(millis), *common, "--max-age", "0")
    assert archived.returncode == 0, archived.stderr
    micros = definitions(tmp_path / "micros.py", V2_MICROS, topic, [])
    result = run_flow(micros, tmp_path, kafka_bootstrap)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'ts'" in result.stderr
    assert "timestamp-millis" in result.stderr
