"""Benchmark: live freshness, the time from producing an event to Kafka until the read client in
another process than the writer serves a value that includes it, at a steady background load.

Starts `python -m flows.run --kafka` (following the log) on a fresh topic, produces --rate
events/s of background load over --keys keys, and every 20 ms a probe event for a new key; a
FeatureClient polls for each probe's count to turn 1. Reports freshness p50/p95/p99 and the
rates actually reached. Needs the broker of scripts/kafka (KAFKA_BOOTSTRAP, default
127.0.0.1:9092).

    python scripts/bench_freshness.py [--rate 20000] [--seconds 30] [--partitions 4]
                                      [--example] [--history-minutes 60]

With --example the flow runs the shipped example's user view (flows/examples/
card_transactions.py: 10 features incl. a KLL p95, a 180-day sum and a 7-day std) instead of the
4-feature view below; the events then also carry a merchant and a channel.

With --history-minutes M, every key first gets one event per minute of the past M minutes and the
measurement starts once the flow has applied them: the tiles a flow that has been live for M
minutes holds (a 1-hour KLL window keeps up to 60 one-minute sketches per key), which is what
makes each touched key dearer to merge than in a fresh flow.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from workload import SCHEMA

from connectors.kafka import AvroProducer
from state.client import FeatureClient
from state.errors import StateError

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = """
from flows.spec import FeatureView, Source, count, mean, sum
src = Source(name="fresh", schema={schema!r}, key="user_id", timestamp="ts",
             partitions={partitions}, topic={topic!r})
live = FeatureView(name="live", source=src, features=[
    count(window="30m"), sum("amount", window="1h"), mean("amount", window="1d"), count()])
"""


EXAMPLE = """
import dataclasses
from flows.examples import card_transactions as example
src = dataclasses.replace(example.transactions, topic={topic!r}, partitions={partitions},
                          schema={schema!r})
live = dataclasses.replace(example.user_spend, name="live", source=src)
"""
EXAMPLE_SCHEMA = REPO / "flows" / "examples" / "schemas" / "transaction.avsc"


def start_flow(
    tmp: Path, bootstrap: str, topic: str, partitions: int, example: bool
) -> subprocess.Popen[str]:
    defs = tmp / "defs.py"
    if example:
        defs.write_text(
            EXAMPLE.format(schema=str(EXAMPLE_SCHEMA), partitions=partitions, topic=topic)
        )
    else:
        defs.write_text(DEFINITIONS.format(schema=SCHEMA, partitions=partitions, topic=topic))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.run",
            "--features",
            str(defs),
            "--kafka",
            bootstrap,
            "--warehouse",
            str(tmp / "wh"),
            "--state",
            str(tmp / "state"),
            "--status-interval",
            "10",
        ],
        env=env,
        text=True,
    )


def event_schema(example: bool) -> dict[str, object]:
    if example:
        schema: dict[str, object] = orjson.loads(EXAMPLE_SCHEMA.read_bytes())
        return schema
    return SCHEMA


def background_load(
    bootstrap: str,
    topic: str,
    rate: int,
    keys: int,
    stop: threading.Event,
    sent: list[int],
    example: bool,
) -> None:
    producer = AvroProducer(bootstrap, topic, event_schema(example), {"linger.ms": 2})
    rng = np.random.default_rng(1)
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    next_at = time.monotonic()
    extra = {"merchant": "m1", "channel": "web"} if example else {}
    while not stop.is_set():
        now_us = time.time_ns() // 1000
        users = rng.integers(0, keys, per_tick)
        amounts = np.round(rng.lognormal(3, 1, per_tick), 2).tolist()
        producer.produce(
            [
                {"user_id": f"u{u}", "ts": now_us, "amount": a, **extra}
                for u, a in zip(users, amounts, strict=True)
            ],
            key_field="user_id",
        )
        sent[0] += per_tick
        next_at += tick
        time.sleep(max(0.0, next_at - time.monotonic()))
    producer.flush()


def prefill(bootstrap: str, topic: str, keys: int, minutes: int, example: bool) -> int:
    """One event per key per minute of the past `minutes` minutes, in event-time order."""
    producer = AvroProducer(bootstrap, topic, event_schema(example), {"linger.ms": 20})
    rng = np.random.default_rng(2)
    extra = {"merchant": "m1", "channel": "web"} if example else {}
    now_us = time.time_ns() // 1000
    for minute in range(minutes, 0, -1):
        at = now_us - minute * 60_000_000 + np.sort(rng.integers(0, 60_000_000, keys))
        amounts = np.round(rng.lognormal(3, 1, keys), 2).tolist()
        records = [
            {"user_id": f"u{u}", "ts": int(t), "amount": a, **extra}
            for u, t, a in zip(rng.permutation(keys).tolist(), at.tolist(), amounts, strict=True)
        ]
        producer.produce(records, key_field="user_id")
        producer.flush()  # one minute at a time: the producer's queue stays small
    return keys * minutes


def wait_applied(bootstrap: str, topic: str, state: Path, example: bool) -> None:
    """Until an event produced now is readable (the flow has applied everything before it)."""
    producer = AvroProducer(bootstrap, topic, event_schema(example), {"linger.ms": 0})
    key = f"caught-up-{uuid.uuid4().hex[:8]}"
    producer.produce([{"user_id": key, "ts": time.time_ns() // 1000, "amount": 1.0}], "user_id")
    producer.flush()
    count = "count_30m" if example else "count"
    deadline = time.monotonic() + 600
    with FeatureClient(state, refresh_s=0.1) as client:
        while client.get("live", key, at=time.time_ns() / 1e9)[count] < 1:
            if time.monotonic() > deadline:
                raise SystemExit("the flow did not apply the history in 10 minutes")
            time.sleep(0.2)


def probes(bootstrap: str, topic: str, state: Path, seconds: float, example: bool) -> list[float]:
    producer = AvroProducer(bootstrap, topic, event_schema(example), {"linger.ms": 0})
    count = "count_30m" if example else "count"
    latencies: list[float] = []
    pending: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    next_probe = time.monotonic()
    with FeatureClient(state, refresh_s=0.02) as client:
        while time.monotonic() < deadline or pending:
            now = time.monotonic()
            if now >= next_probe and now < deadline:
                key = f"probe-{uuid.uuid4().hex[:8]}"
                pending[key] = time.monotonic()
                producer.produce(
                    [{"user_id": key, "ts": time.time_ns() // 1000, "amount": 1.0}],
                    key_field="user_id",
                )
                producer._producer.poll(0)
                next_probe = now + 0.02
            if pending:
                keys = list(pending)
                at = (time.time_ns() // 1000 + 1) / 1e6
                for key, values in zip(keys, client.get_many("live", keys, at=at), strict=True):
                    if values[count] >= 1:
                        latencies.append(time.monotonic() - pending.pop(key))
            if time.monotonic() > deadline + 30:
                break
            time.sleep(0.005)
    return latencies


def wait_live(state: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with FeatureClient(state) as client:
                if "live" in client.views():
                    return
        except StateError:
            pass
        time.sleep(0.2)
    raise SystemExit("the flow did not make the view live in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument(
        "--example", action="store_true", help="run the shipped example's user view (10 features)"
    )
    parser.add_argument(
        "--history-minutes",
        type=int,
        default=0,
        help="first give every key one event per minute of the past M minutes (steady state)",
    )
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(15)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        flow = start_flow(tmp, bootstrap, topic, args.partitions, args.example)
        try:
            wait_live(tmp / "state")
            if args.history_minutes:
                began = time.monotonic()
                n = prefill(bootstrap, topic, args.keys, args.history_minutes, args.example)
                wait_applied(bootstrap, topic, tmp / "state", args.example)
                print(f"history: {n:,} events applied in {time.monotonic() - began:.1f} s")
            stop, sent = threading.Event(), [0]
            load = threading.Thread(
                target=background_load,
                daemon=True,
                args=(bootstrap, topic, args.rate, args.keys, stop, sent, args.example),
            )
            started = time.monotonic()
            load.start()
            time.sleep(2)  # reach the steady state first
            latencies = probes(bootstrap, topic, tmp / "state", args.seconds, args.example)
            stop.set()
            load.join()
            elapsed = time.monotonic() - started
        finally:
            flow.terminate()
            flow.wait(30)
    admin.delete_topics([topic])
    ms = np.array(latencies) * 1000
    print(
        f"background load: {sent[0] / elapsed:,.0f} events/s over {args.partitions} "
        f"partitions, {args.keys:,} keys; {len(ms)} probes"
    )
    print(
        f"freshness (produce -> readable in another process): p50 {np.percentile(ms, 50):.0f} "
        f"ms, p95 {np.percentile(ms, 95):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms, "
        f"max {ms.max():.0f} ms (target p99 < 500 ms)"
    )


if __name__ == "__main__":
    main()
