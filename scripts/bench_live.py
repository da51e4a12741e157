"""Benchmark: the live path's throughput from Kafka, per partition, per process and for a cluster
of 2 processes, for the sizing model in the README.

Produces --events events (the 9-feature spend workload of scripts/workload.py, --keys users)
into a fresh topic before the clock starts, then times `flows.run --kafka --until-caught-up`
over it on an empty warehouse and state: consume, decode, validate, route, aggregate, commit
(Kafka batches of up to 5k records, as when following the log). Three runs: a 1-partition
topic (one partition's ceiling), a 4-partition topic with one process, and the same topic with
a cluster of 2 processes (`--addresses`, `--separate-state`). Times are whole commands.

    python scripts/bench_live.py [--events 1000000] [--keys 100000] [--kafka 127.0.0.1:9092]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]
from workload import SCHEMA, cluster_addresses, transactions

from connectors.kafka import AvroProducer

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = """
from flows.spec import FeatureView, Source, count, mean, sum
txn = Source(name="txn", schema={schema!r}, key="user_id", timestamp="ts",
             partitions={parts}, topic={topic!r})
spend = FeatureView(name="spend", source=txn, features=[
    f(window=w) if f is count else f("amount", window=w)
    for w in ("30m", "14d", "180d") for f in (count, sum, mean)])
"""
CHUNK = 200_000


def make_topic(bootstrap: str, partitions: int, events: int, keys: int) -> str:
    topic = f"bench-live-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[
        topic
    ].result(timeout=15)
    table = transactions(events, keys)
    producer = AvroProducer(bootstrap, topic, SCHEMA)
    for first in range(0, events, CHUNK):
        producer.produce(table.slice(first, CHUNK).to_pylist(), key_field="user_id")
    producer.flush()
    return topic


def run(tmp: Path, bootstrap: str, topic: str, partitions: int, processes: int) -> float:
    name = f"p{partitions}-x{processes}"
    defs = tmp / f"{name}.py"
    defs.write_text(DEFINITIONS.format(schema=SCHEMA, parts=partitions, topic=topic))
    common = [
        *("--features", str(defs), "--warehouse", str(tmp / f"wh-{name}"), "--kafka", bootstrap),
        *("--until-caught-up", "--status-interval", "60"),
    ]
    cluster: list[list[str]] = [[]]
    if processes > 1:
        addresses = cluster_addresses(processes)
        cluster = [
            ["--addresses", addresses, "--process-id", str(i), "--separate-state"]
            for i in range(processes)
        ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.run", *common, "--state", str(tmp / f"{name}-{i}"), *c],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, c in enumerate(cluster)
    ]
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"flows.run failed:\n{out[-2000:]}\n{err[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--kafka", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    args = parser.parse_args()
    n = args.events
    one = make_topic(args.kafka, 1, n, args.keys)
    four = make_topic(args.kafka, 4, n, args.keys)
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp_name:
        tmp = Path(tmp_name)
        rows = [
            ("1 partition, 1 process", run(tmp, args.kafka, one, 1, 1)),
            ("4 partitions, 1 process", run(tmp, args.kafka, four, 4, 1)),
            ("4 partitions, 2 processes (cluster)", run(tmp, args.kafka, four, 4, 2)),
        ]
    AdminClient({"bootstrap.servers": args.kafka}).delete_topics([one, four])
    print(f"workload: {n:,} events pre-produced to Kafka, {args.keys:,} keys, 9 features")
    for label, seconds in rows:
        print(f"{label:<36} {seconds:6.1f} s  {n / seconds:>10,.0f} events/s (whole command)")


if __name__ == "__main__":
    main()
