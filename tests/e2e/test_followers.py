"""Serving replicas the Kappa way: two followers (`flows.run --kafka` with the same definitions,
each into its own --state, as on two serving hosts) consume one topic and, once caught up, give
equal reads; the same holds while one of them started late (it replays the topic from its
start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.kafka import AvroProducer
from flows.spec import load_definitions
from state.client import FeatureClient
from state.errors import StateError
from tests.conftest import TopicFactory
from tests.helpers import MINUTE, REPO, make_events, wait_until, write_definitions

pytestmark = pytest.mark.kafka


def start_follower(
    features: Path, root: Path, name: str, bootstrap: str
) -> subprocess.Popen[bytes]:
    """`flows.run --kafka` without --until-caught-up: a follower that keeps consuming."""
    with open(root / f"{name}.log", "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.run",
                "--features",
                str(features),
                "--kafka",
                bootstrap,
                "--warehouse",
                str(root / f"{name}-wh"),
                "--state",
                str(root / f"{name}-state"),
                "--status-interval",
                "1",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def applied_events(state: Path, keys: list[str]) -> int:
    """Events the follower's `spend` view holds (its lifetime count over every key)."""
    try:
        with FeatureClient(state) as client:
            return sum(row["count"] for row in client.get_many("spend", keys))
    except StateError:  # not created yet
        return -1


def wait_caught_up(
    state: Path, keys: list[str], total: int, proc: subprocess.Popen[bytes], log: Path
) -> None:
    wait_until(
        lambda: applied_events(state, keys) == total,
        f"follower {state} to catch up with {total} events",
        timeout=120,
        interval=0.2,
        process=proc,
        log=log,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_two_followers_of_one_topic_read_equal(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(3)
    features = write_definitions(tmp_path / "defs", partitions=3, topic=topic)
    schema = load_definitions(features).sources["txns"].avro_schema()
    events = make_events(3000, 30, seed=11)
    keys = sorted(set(events.column("user_id").to_pylist()))
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    producer.produce(events.slice(0, 1500).to_pylist(), key_field="user_id")
    producer.flush()

    first = start_follower(features, tmp_path, "a", kafka_bootstrap)
    second = None
    try:
        wait_caught_up(tmp_path / "a-state", keys, 1500, first, tmp_path / "a.log")
        second = start_follower(features, tmp_path, "b", kafka_bootstrap)  # a host added later
        producer.produce(events.slice(1500).to_pylist(), key_field="user_id")
        producer.flush()
        for name, proc in (("a", first), ("b", second)):
            wait_caught_up(tmp_path / f"{name}-state", keys, 3000, proc, tmp_path / f"{name}.log")
        newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
        with FeatureClient(tmp_path / "a-state") as a, FeatureClient(tmp_path / "b-state") as b:
            for view in ("spend", "channels"):
                for at in (newest + MINUTE, newest + 90 * MINUTE):
                    expected = a.get_many(view, [*keys, "nobody"], at=at / 1e6)
                    assert b.get_many(view, [*keys, "nobody"], at=at / 1e6) == expected
            assert sum(r["count"] for r in a.get_many("spend", keys)) == 3000
    finally:
        stop(first)
        if second is not None:
            stop(second)
