"""Freshness while the topic is idle (issue 14 item 9), with the real broker: the gauge kept
growing (now minus the newest arrival) as if the flow fell behind. Now freshness is the
arrival-to-applied delay of the newest record, the last event's age is a gauge of its own, and
the console says "idle"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import AvroProducer
from tests.conftest import TopicFactory
from tests.helpers import REPO, TXN_SCHEMA, wait_until, write_definitions

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gauges(port: int, name: str) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
    ]


def test_freshness_does_not_grow_while_the_topic_is_idle(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(1)
    features = write_definitions(tmp_path / "defs", partitions=1, topic=topic)
    port, log = free_port(), tmp_path / "flow.log"
    args = ["--features", str(features), "--warehouse", str(tmp_path / "wh"), "--state"]
    args += [str(tmp_path / "state"), "--kafka", kafka_bootstrap, "--status-interval", "0.5"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.run", *args, "--metrics-port", str(port)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        producer = AvroProducer(kafka_bootstrap, topic, TXN_SCHEMA)
        wait_until(
            lambda: "  live  events" in log.read_text(),
            "the flow to catch up with the empty topic",
            process=proc,
            log=log,
        )
        producer.produce([{"user_id": "u1", "ts": 1_790_000_000_000_000}], "user_id")
        producer.flush()
        wait_until(
            lambda: "live  events 1 " in log.read_text(),
            "the flow to apply the event",
            process=proc,
            log=log,
        )
        time.sleep(4)  # idle
        freshness = gauges(port, "featureflow_freshness_seconds")  # one per view
        age = gauges(port, "featureflow_last_event_age_seconds")
        last_line = log.read_text().strip().splitlines()[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert len(freshness) == len(age) == 2
    assert max(freshness) < 2.5, log.read_text()  # the delay when applied, not its age
    assert min(age) >= 4
    assert "idle (last event" in last_line, last_line
