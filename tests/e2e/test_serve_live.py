"""The HTTP server while `flows.run --kafka` writes the views it serves: no request fails, a
key's lifetime count never goes back, and once the follower has caught up the server's rows
equal the embedded client's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.kafka import AvroProducer
from flows.spec import load_definitions
from state.client import FeatureClient
from tests.conftest import TopicFactory
from tests.e2e.test_followers import start_follower, stop, wait_caught_up
from tests.helpers import MINUTE, make_events, write_definitions
from tests.serve_helpers import Server, serving

pytestmark = pytest.mark.kafka


def test_reads_while_flows_run_writes(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(3)
    features = write_definitions(tmp_path / "defs", partitions=3, topic=topic)
    schema = load_definitions(features).sources["txns"].avro_schema()
    events = make_events(6000, 20, seed=12)
    keys = sorted(set(events.column("user_id").to_pylist()))
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    producer.produce(events.slice(0, 500).to_pylist(), key_field="user_id")
    producer.flush()
    flow = start_follower(features, tmp_path, "live", kafka_bootstrap)
    state, log = tmp_path / "live-state", tmp_path / "live.log"
    failures: list[str] = []
    totals: list[int] = []
    stop_reading = threading.Event()

    def read_loop(server: Server) -> None:
        http = server.http()
        while not stop_reading.is_set():
            answer = http.post("/v1/views/spend", {"keys": keys})
            if answer.status != 200:
                failures.append(f"{answer.status}: {answer.body[:200]!r}")
                continue
            totals.append(sum(row["count"] for row in answer.json()["rows"]))
        http.close()

    try:
        wait_caught_up(state, keys, 500, flow, log)
        with serving(state) as server:
            reader = threading.Thread(target=read_loop, args=(server,))
            reader.start()
            for start in range(500, 6000, 500):  # the writer applies while the server reads
                producer.produce(events.slice(start, 500).to_pylist(), key_field="user_id")
                producer.flush()
            wait_caught_up(state, keys, 6000, flow, log)
            stop_reading.set()
            reader.join()
            newest = int(events.column("ts").cast(pa.int64()).to_numpy().max())
            at = (newest + MINUTE) / 1e6
            http = server.http()
            # The server's client catches up with the writer on its own cadence: wait until it
            # has every event (not a fixed time), then compare its answers with a fresh client.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rows = http.post("/v1/views/spend", {"keys": keys, "at": at}).json()["rows"]
                if sum(row["count"] for row in rows) == 6000:
                    break
                time.sleep(0.05)
            served = {
                v: http.post(f"/v1/views/{v}", {"keys": keys, "at": at})
                for v in ("spend", "channels")
            }
            http.close()
    finally:
        stop(flow)
    assert failures == []
    assert len(totals) > 5
    assert totals == sorted(totals)  # a later read never sees fewer events
    assert totals[0] < 6000
    with FeatureClient(state) as client:
        for view, answer in served.items():
            assert answer.json()["rows"] == client.get_many(view, keys, at=at)
