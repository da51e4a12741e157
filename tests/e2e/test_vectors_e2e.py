"""Vector features end to end: history files (JSON lines) ingested, and Avro records produced to
the real Kafka broker, then `flows.run`; the read client (`list[float]`), the snapshot (an Arrow
list column) and the NumPy oracle agree, and a vector of the wrong length is a dead letter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.avro import SchemaStore, arrow_schema
from connectors.kafka import AvroProducer
from connectors.kafka_reader import KafkaLogReader
from connectors.segments import Warehouse
from flows.spec import load_definitions
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.helpers import run_command
from tests.vector_oracle import (
    DAY,
    HOUR,
    MINUTE,
    differences,
    events_of,
    oracle_rows,
    well_formed,
)

SCHEMA = """{
  "type": "record", "name": "Doc", "namespace": "test",
  "fields": [
    {"name": "user_id", "type": "string"},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "text_embedding", "type": ["null", {"type": "array", "items": "float"}],
     "default": null}
  ]
}"""
DEFINITIONS = """
from flows.spec import FeatureView, Source, count, last, mean

docs = Source(name="docs", schema="doc.avsc", key="user_id", timestamp="ts", partitions=2,
              topic={topic!r})
user_text = FeatureView(name="user_text", source=docs, features=[
    mean("text_embedding", window="30d"), mean("text_embedding", window="2h", hop="10m"),
    last("text_embedding"), count("text_embedding", window="1d"), count(window="1d"),
])
"""
T0 = 1_780_000_000_000_000
DIM = 16
KEYS = [f"user{k}" for k in range(30)]


def write_definitions(directory: Path, topic: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "doc.avsc").write_text(SCHEMA)
    path = directory / "features.py"
    path.write_text(DEFINITIONS.format(topic=topic))
    return path


def make_records(n: int, seed: int) -> list[dict[str, Any]]:
    """Records in log order: out of order by up to an hour, null vectors, and every 97th
    vector one element short (a dead letter unless it is its key's first)."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.integers(0, 3 * DAY, n))
    ts = ts - np.where(rng.random(n) < 0.1, rng.integers(0, HOUR, n), 0)
    records = []
    for i in range(n):
        dim = DIM - 1 if i % 97 == 50 else DIM
        vector = None if rng.random() < 0.1 else np.float32(rng.normal(0, 1, dim)).tolist()
        records.append(
            {
                "user_id": KEYS[int(rng.integers(0, len(KEYS)))],
                "ts": int(ts[i]),
                "text_embedding": vector,
            }
        )
    return records


def log_of(warehouse: Path) -> pa.Table:
    wh = Warehouse(warehouse)
    return pa.concat_tables(
        pa.Table.from_batches(list(wh.read("docs", p))) for p in range(2) if wh.segments("docs", p)
    )


def check_views(state: Path, features: Path, log: pa.Table) -> dict[str, Any]:
    """The client's values at three times equal the oracle's over `log`; returns the layout's
    oracle events for further checks."""
    layout = load_definitions(features).layouts["user_text"]
    kept = well_formed(events_of(log, "user_id", "ts", ("text_embedding",)), ("text_embedding",))
    newest = int(log.column("ts").cast(pa.int64()).to_numpy().max())
    keys = [*KEYS, "nobody"]
    with FeatureClient(state) as client:
        for t in (newest + 1, newest + 17 * MINUTE, newest + 40 * DAY):
            got = client.get_many("user_text", keys, at=t / 1e6)
            expected = oracle_rows(layout, kept, keys, [t] * len(keys))
            assert differences(layout, expected, got) == []
            assert isinstance(got[0]["text_embedding_last"], list)
    return {"layout": layout, "kept": kept, "newest": newest}


def test_ingest_run_client_and_snapshot_equal_the_oracle(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs")
    records = make_records(3000, seed=4)
    lines = [orjson.dumps({**r, "ts": r["ts"] // 1000}) for r in records]  # epoch millis
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    ingest = run_command("flows.ingest", *common, "--time-unit", "ms", str(tmp_path / "docs.jsonl"))
    assert ingest.returncode == 0, ingest.stderr
    run = run_command("flows.run", *common, "--state", str(tmp_path / "state"), "--until-caught-up")
    assert run.returncode == 0, run.stderr
    log = log_of(tmp_path / "wh")
    assert log.schema.field("text_embedding").type.value_type == pa.float32()
    checked = check_views(tmp_path / "state", features, log)
    dead = log.num_rows - len(checked["kept"])
    assert dead > 10
    assert f"applied {len(checked['kept']):,} events" in run.stdout
    assert f"dead letters {dead:,}" in run.stdout

    newest, keys = checked["newest"], [*KEYS, "nobody"]
    rng = np.random.default_rng(9)
    past = rng.integers(T0, newest, 300).tolist()
    times = [newest + 1] * len(keys) + past
    spine_keys = keys + [KEYS[int(k)] for k in rng.integers(0, len(KEYS), 300)]
    spine = pa.table({"user_id": spine_keys, "ts": pa.array(times, pa.timestamp("us", tz="UTC"))})
    pq.write_table(spine, tmp_path / "spine.parquet")
    out = tmp_path / "snap.parquet"
    snap = run_command(
        "flows.snapshot", *common, "--spine", str(tmp_path / "spine.parquet"), "--out", str(out)
    )
    assert snap.returncode == 0, snap.stderr
    table = pq.read_table(out)
    assert table.schema.field("user_text__text_embedding_mean_30d").type == pa.list_(pa.float64())
    layout = checked["layout"]
    rows = [
        {f.name: row[f"user_text__{f.name}"] for f in layout.features} for row in table.to_pylist()
    ]
    expected = oracle_rows(layout, checked["kept"], spine_keys, times)
    assert differences(layout, expected, rows) == []
    with FeatureClient(tmp_path / "state") as client:
        online = client.get_many("user_text", keys, at=(newest + 1) / 1e6)
    assert differences(layout, online, rows[: len(keys)]) == []


@pytest.mark.kafka
def test_kafka_producer_to_client_equals_the_oracle(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(2)
    features = write_definitions(tmp_path / "defs", topic=topic)
    schema = load_definitions(features).sources["docs"].avro_schema()
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    producer.produce(make_records(2000, seed=6), key_field="user_id")
    producer.flush()
    state = tmp_path / "state"
    run = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--kafka",
        kafka_bootstrap,
        "--state",
        str(state),
        "--until-caught-up",
    )
    assert run.returncode == 0, run.stderr
    log = kafka_log(kafka_bootstrap, topic, schema)
    assert log.num_rows == 2000
    checked = check_views(state, features, log)
    dead = 2000 - len(checked["kept"])
    assert dead > 10
    assert f"dead letters {dead:,}" in run.stdout


def kafka_log(bootstrap: str, topic: str, schema: dict[str, Any]) -> pa.Table:
    tables = []
    for p in range(2):
        reader = KafkaLogReader(
            bootstrap, topic, p, 0, SchemaStore(schema), arrow_schema(schema), key_field="user_id"
        )
        try:
            while not (batch := reader.read_batch(5000)).at_end or batch.events.num_rows:
                tables.append(pa.Table.from_batches([batch.events]))
        finally:
            reader.close()
    return pa.concat_tables(tables)
