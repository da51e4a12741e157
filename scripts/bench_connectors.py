"""Throughput of the connectors (a benchmark, not a test): run
`python scripts/bench_connectors.py [--kafka HOST:PORT] [--events N]`.

Measures the partitioner, Avro batch decoding against a per-record fastavro loop, warehouse
segment append and read, and, with --kafka, KafkaLogReader against a plain confluent-kafka
consume loop with fastavro's schemaless_reader on the same topic.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]
from fastavro import parse_schema, schemaless_reader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.avro import (  # noqa: E402
    HEADER_SIZE,
    SchemaStore,
    arrow_schema,
    decode_batch,
    encode_single_object,
)
from connectors.kafka import AvroProducer  # noqa: E402
from connectors.kafka_reader import KafkaLogReader  # noqa: E402
from connectors.partitioner import murmur2, partitions_for  # noqa: E402
from connectors.segments import Warehouse  # noqa: E402

SCHEMA_FILE = ROOT / "flows" / "examples" / "schemas" / "transaction.avsc"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
TS0 = 1_700_000_000_000_000


def records(n: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    channels = ["web", "pos", "app", None]
    return [
        {
            "user_id": f"user-{rng.randrange(100_000)}",
            "ts": TS0 + i * 1000,
            "amount": rng.uniform(1, 500),
            "merchant": f"m{rng.randrange(1000)}",
            "channel": channels[i % 4],
            "is_fraud": rng.random() < 0.01,
        }
        for i in range(n)
    ]


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_partitioner() -> None:
    keys = [f"user-{i}".encode() for i in range(200_000)]
    seconds = best(lambda: [murmur2(k) for k in keys])
    print(f"murmur2 (pure Python, one key)     {seconds / len(keys) * 1e6:8.2f} µs/key")
    rng = np.random.default_rng(1)
    column = pa.array([f"user-{i}" for i in rng.integers(0, 100_000, 1_000_000)])
    seconds = best(lambda: partitions_for(column, 8))
    print(f"partitions_for 1M rows, 100k keys  {1e6 / seconds / 1e6:8.2f} M rows/s")
    distinct = pa.array([f"user-{i}" for i in range(1_000_000)])
    seconds = best(lambda: partitions_for(distinct, 8))
    print(f"partitions_for 1M distinct keys    {seconds / len(distinct) * 1e6:8.2f} µs/key")


def bench_decode(n: int) -> None:
    payloads = [encode_single_object(r, SCHEMA) for r in records(n)]
    store, schema = SchemaStore(SCHEMA), arrow_schema(SCHEMA)
    seconds = best(lambda: decode_batch(store, payloads, schema))
    print(f"decode_batch {n:,} records        {n / seconds:12,.0f} events/s")
    parsed = parse_schema(SCHEMA)

    def fastavro_loop() -> None:
        rows = [schemaless_reader(io.BytesIO(p[HEADER_SIZE:]), parsed, None) for p in payloads]
        pa.RecordBatch.from_pylist(rows, schema=schema)

    seconds = best(fastavro_loop)
    print(f"fastavro per record + from_pylist  {n / seconds:12,.0f} events/s")


def bench_segments(n: int) -> None:
    table = pa.Table.from_pylist(records(n), schema=arrow_schema(SCHEMA))
    us = pa.timestamp("us", tz="UTC")
    table = table.append_column("_offset", pa.array(np.arange(n, dtype=np.int64)))
    table = table.append_column("_partition", pa.array(np.zeros(n, dtype=np.int32)))
    table = table.append_column("_arrival", pa.array(np.full(n, TS0)).cast(us))
    with tempfile.TemporaryDirectory() as root:
        warehouse = Warehouse(root)
        started = time.perf_counter()
        warehouse.append("tx", 0, table, fingerprint="bench", ts_column="ts")
        print(
            f"segment append {n:,} rows         {n / (time.perf_counter() - started):12,.0f}"
            " events/s"
        )
        seconds = best(lambda: sum(b.num_rows for b in warehouse.read("tx", 0)))
        print(f"segment read {n:,} rows           {n / seconds:12,.0f} events/s")


def bench_kafka(bootstrap: str, n: int) -> None:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result()
    try:
        producer = AvroProducer(bootstrap, topic, SCHEMA, {"linger.ms": 50})
        producer.produce(records(n), key_field="user_id")
        producer.flush(120)
        store, schema = SchemaStore(SCHEMA), arrow_schema(SCHEMA)
        started = time.perf_counter()
        with KafkaLogReader(bootstrap, topic, 0, 0, store, schema, key_field="user_id") as reader:
            got = 0
            while got < n:
                got += reader.read_batch(5000, 1.0).events.num_rows
        seconds = time.perf_counter() - started
        print(f"KafkaLogReader {n:,} records      {n / seconds:12,.0f} events/s")
        print(
            f"plain consume + schemaless_reader  {n / plain_loop(bootstrap, topic, n):12,.0f}"
            " events/s"
        )
    finally:
        admin.delete_topics([topic])[topic].result()


def plain_loop(bootstrap: str, topic: str, n: int) -> float:
    parsed = parse_schema(SCHEMA)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    rows: list[Any] = []
    started = time.perf_counter()
    while len(rows) < n:
        for message in consumer.consume(5000, 1.0):
            value = message.value()
            if message.error() is None and value is not None:
                rows.append(schemaless_reader(io.BytesIO(value[HEADER_SIZE:]), parsed, None))
    seconds = time.perf_counter() - started
    consumer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", help="bootstrap servers; without it Kafka is skipped")
    parser.add_argument("--events", type=int, default=100_000, help="records to decode")
    parser.add_argument("--kafka-events", type=int, default=200_000)
    parser.add_argument("--segment-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    bench_partitioner()
    bench_decode(args.events)
    bench_segments(args.segment_rows)
    if args.kafka:
        bench_kafka(args.kafka, args.kafka_events)


if __name__ == "__main__":
    main()
