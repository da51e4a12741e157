"""Kafka resilience of the log: the flow and the producer ride through a broker restart with no
loss and no duplicate, and a retention gap (records Kafka deleted before they were archived)
stops the flow with an error naming the missing range instead of skipping data.

The restart test stops and starts a broker of its own (scripts/kafka on free ports, data under
tmp_path), never the shared one; the gap tests only delete records, on fresh topics of the
shared broker.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import TopicPartition

# The stubs of some confluent-kafka releases do not re-export NewTopic from its documented home.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]
from prometheus_client.parser import text_string_to_metric_families

from connectors.avro import SchemaStore, arrow_schema
from connectors.kafka import AvroProducer
from connectors.kafka_admin import partition_watermarks
from connectors.kafka_reader import KafkaLogReader
from flows.cli import EXIT_ERROR
from flows.runplan import read_progress
from flows.spec import Definitions, load_definitions
from state.client import FeatureClient
from state.codec import EVENTS_APPLIED, decode_int
from state.layout import ViewLayout
from state.read import evaluate_blob
from state.store import ViewStore, iter_entities, open_secondary, partition_dir
from tests.conftest import TopicFactory
from tests.helpers import MINUTE, REPO, make_events, run_command, wait_until, write_definitions
from tests.oracle import mismatches, oracle_values

pytestmark = pytest.mark.kafka

VIEWS = ("spend", "channels")
EVENT_COLUMNS = ["user_id", "ts", "amount", "channel"]


# --- an own broker ------------------------------------------------------------------------------


class BrokerError(Exception):
    """scripts/kafka could not start or stop the test's own broker."""


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class OwnBroker:
    """A single-node broker run by scripts/kafka on its own ports, with its own data dir."""

    data: Path
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _script(self, action: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "KAFKA_DATA": str(self.data),
            "PYTHON": sys.executable,
        }
        return subprocess.run(
            [str(REPO / "scripts" / "kafka"), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def start(self) -> None:
        result = self._script("start")
        if result.returncode != 0:
            raise BrokerError(
                f"scripts/kafka start on {self.bootstrap} (data {self.data}) failed "
                f"with exit {result.returncode}:\n{result.stdout}{result.stderr}"
            )

    def stop(self) -> None:
        result = self._script("stop")
        if result.returncode != 0:
            raise BrokerError(f"scripts/kafka stop failed:\n{result.stdout}{result.stderr}")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    """A broker of this test only, stopped at the end whatever happened; if it cannot start,
    the test fails under CI (env CI) and is skipped elsewhere."""
    broker = OwnBroker(tmp_path / "kafka", *free_ports(2))
    try:
        try:
            broker.start()
        except (BrokerError, subprocess.TimeoutExpired) as exc:
            if os.environ.get("CI"):
                pytest.fail(f"cannot start an own Kafka broker: {exc}")
            pytest.skip(f"cannot start an own Kafka broker: {exc}")
        yield broker
    finally:
        broker.stop()


def create_topic(bootstrap: str, partitions: int) -> str:
    name = f"resilience-{os.urandom(6).hex()}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1)
    admin.create_topics([topic], operation_timeout=10)[name].result(timeout=30)
    return name


def delete_records_before(bootstrap: str, topic: str, partition: int, offset: int) -> None:
    """What retention does: Kafka drops the partition's records below `offset`."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_records(
        [TopicPartition(topic, partition, offset)], request_timeout=30, operation_timeout=30
    )
    for future in futures.values():
        assert future.result(timeout=60).low_watermark == offset


# --- producing and reading the log --------------------------------------------------------------


def produce(producer: AvroProducer, events: pa.Table) -> None:
    producer.produce(events.to_pylist(), key_field="user_id")


def read_kafka_log(bootstrap: str, topic: str, schema: dict[str, Any], partitions: int) -> pa.Table:
    """Every record of the topic, with its Kafka offset (`_offset`) and partition; asserts the
    offsets of each partition run from its low watermark to its end without a hole."""
    tables = []
    for p in range(partitions):
        low, high = partition_watermarks(bootstrap, topic, p)
        reader = KafkaLogReader(
            bootstrap, topic, p, low, SchemaStore(schema), arrow_schema(schema), key_field="user_id"
        )
        got: list[pa.Table] = []
        deadline = time.monotonic() + 30
        try:
            while sum(t.num_rows for t in got) < high - low and time.monotonic() < deadline:
                batch = reader.read_batch(5000, timeout_s=0.5)
                assert not batch.failures
                got.append(pa.Table.from_batches([batch.events]))
        finally:
            reader.close()
        part = pa.concat_tables(got)
        assert part.column("_offset").to_pylist() == list(range(low, high))
        tables.append(part)
    return pa.concat_tables(tables)


def rows(table: pa.Table) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r.values()) for r in table.select(EVENT_COLUMNS).to_pylist())


# --- reading the views --------------------------------------------------------------------------


def progress(state: Path, view: str, version: int, partitions: int) -> dict[int, int]:
    store = ViewStore(state)
    return {p: read_progress(store, view, version, p).applied_offset for p in range(partitions)}


def live_progress(state: Path, partitions: int) -> dict[str, dict[int, int]] | None:
    """Applied offset per partition of each live view; None until every view is live."""
    if not (state / "FORMAT").is_file():
        return None
    store = ViewStore(state)
    out = {}
    for view in VIEWS:
        version = store.current_version(view)
        if version is None:
            return None
        out[view] = progress(state, view, version, partitions)
    return out


def stored_partition(
    state: Path, view: str, version: int, partition: int, t: int
) -> tuple[int, dict[str, dict[str, Any]]]:
    """(events applied, entity -> feature values as of t) of one view partition, live or not,
    read through a RocksDB secondary and the client's evaluator."""
    store = ViewStore(state)
    layout = store.layout(view, version)
    primary = partition_dir(store.version_dir(view, version), partition)
    if not (primary / "CURRENT").is_file():
        return 0, {}
    secondary = state.parent / f"secondary-{view}-{version}-{partition}-{os.urandom(4).hex()}"
    db = open_secondary(primary, secondary)
    try:
        raw = db.get(EVENTS_APPLIED)
        applied = decode_int(raw) if raw is not None else 0
        values = {
            key[1:].decode(): evaluate_blob(layout, blob, t) for key, blob in iter_entities(db)
        }
    finally:
        db.close()
    return applied, values


def assert_matches_oracle(
    layout: ViewLayout, log: pa.Table, t: int, values: dict[str, dict[str, Any]]
) -> None:
    keys = sorted(values)
    spine = pa.table({"row": range(len(keys)), "k": keys, "t": [t] * len(keys)})
    expected = oracle_values(layout, log, spine)
    assert mismatches(layout, expected, [values[k] for k in keys]) == []


# --- 1. broker restart mid-stream ---------------------------------------------------------------


def start_flow(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.run", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def applied_per_view(metrics_port: int) -> dict[str, float]:
    """featureflow_events_applied summed over partitions, from the flow's metrics endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "featureflow_events_applied":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    view = sample.labels["view"]
                    totals[view] = totals.get(view, 0.0) + sample.value
    return totals


def kafka_lag(metrics_port: int) -> dict[str, float]:
    """featureflow_kafka_lag_records per partition, from the flow's metrics endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["partition"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "featureflow_kafka_lag_records"
        for sample in family.samples
    }


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    own_broker: OwnBroker, tmp_path: Path
) -> None:
    bootstrap, partitions = own_broker.bootstrap, 2
    topic = create_topic(bootstrap, partitions)
    features = write_definitions(tmp_path / "defs", partitions=partitions, topic=topic)
    defs = load_definitions(features)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(4000, 50, seed=31)
    waves = [events.slice(0, 1500), events.slice(1500, 800), events.slice(2300, 700)]
    waves.append(events.slice(3000))
    producer = AvroProducer(bootstrap, topic, schema)
    produce(producer, waves[0])
    producer.flush(60)

    state, log = tmp_path / "state", tmp_path / "flow.log"
    (metrics_port,) = free_ports(1)
    args = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    args += ["--state", str(state), "--kafka", bootstrap, "--metrics-port", str(metrics_port)]
    proc = start_flow([*args, "--status-interval", "1"], log)
    try:
        # The flow is consuming: the first wave is applied and the views went live.
        wait_until(
            lambda: live_progress(state, partitions), "the views to go live", process=proc, log=log
        )
        produce(producer, waves[1])
        own_broker.stop()  # with wave 2 partly in flight
        produce(producer, waves[2])  # queued while the broker is down
        time.sleep(1)  # the flow polls a broker that is gone
        own_broker.start()  # same data dir: the topic and its records survive
        produce(producer, waves[3])
        producer.flush(120)  # librdkafka retried what the restart interrupted
        ends = {p: partition_watermarks(bootstrap, topic, p)[1] for p in range(partitions)}
        done = {view: {p: ends[p] - 1 for p in ends} for view in VIEWS}
        wait_until(
            lambda: live_progress(state, partitions) == done,
            "the whole log applied",
            process=proc,
            log=log,
        )
        per_view = applied_per_view(metrics_port)
        wait_until(  # the live lag gauge of every partition reports the caught-up tail
            lambda: kafka_lag(metrics_port) == {str(p): 0.0 for p in range(partitions)},
            "a zero Kafka lag on every partition",
            process=proc,
            log=log,
        )
        proc.send_signal(signal.SIGINT)
        exit_code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert exit_code == 0, output
    assert "Traceback" not in output, output
    assert "Connection refused" in output  # its Kafka clients did see the broker go
    assert "stopped by Ctrl-C (SIGINT): applied 4,000 events (per view: " in output, output
    assert "late 0; dead letters 0" in output, output
    assert per_view == {"spend": 4000, "channels": 4000}

    # Kafka itself holds every produced event exactly once (the idempotent producer's retries).
    kafka_log = read_kafka_log(bootstrap, topic, schema, partitions)
    assert kafka_log.num_rows == 4000
    assert rows(kafka_log) == rows(events)

    newest = int(kafka_log.column("ts").cast(pa.int64()).to_numpy().max())
    t = newest + 3 * MINUTE
    produced = Counter(events.column("user_id").to_pylist())
    keys = sorted(produced)
    with FeatureClient(state) as client:
        spend = client.get_many("spend", keys, at=t / 1e6)
        assert {k: v["count"] for k, v in zip(keys, spend, strict=True)} == dict(produced)
        for view in VIEWS:
            got = client.get_many(view, keys, at=t / 1e6)
            assert_matches_oracle(
                defs.layouts[view], kafka_log, t, dict(zip(keys, got, strict=True))
            )
    store = ViewStore(state)
    for view in VIEWS:
        version = store.current_version(view)
        assert version is not None
        applied = [stored_partition(state, view, version, p, t)[0] for p in range(partitions)]
        assert sum(applied) == 4000  # the stored count of applied events: none twice


# --- 2. retention gaps --------------------------------------------------------------------------


def gap_setup(
    kafka_topic: TopicFactory, kafka_bootstrap: str, tmp_path: Path, partitions: int
) -> tuple[str, Definitions, list[str]]:
    topic = kafka_topic(partitions)
    features = write_definitions(tmp_path / "defs", partitions=partitions, topic=topic)
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    return topic, load_definitions(features), [*common, "--kafka", kafka_bootstrap]


def gap_named(result: subprocess.CompletedProcess[str], gaps: dict[int, str]) -> int:
    """The partition whose gap (`partition -> "[first, last]"`) the run's error names."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    named = [
        p for p, gap in gaps.items() if re.search(rf"partition {p}\b[^\n]*{re.escape(gap)}", output)
    ]
    assert len(named) == 1, output
    return named[0]


def assert_clear_error(result: subprocess.CompletedProcess[str]) -> None:
    """A known error ends a command with one `error: ...` line and exit 2 (flows.cli), not a
    traceback: the design's "clear error naming the gap"."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "panicked" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert "LogGapError" not in errors[0]  # the message itself, not a repr
    assert result.returncode == EXIT_ERROR, output


def test_gap_at_the_start_stops_before_applying_anything(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic, defs, common = gap_setup(kafka_topic, kafka_bootstrap, tmp_path, partitions=2)
    producer = AvroProducer(kafka_bootstrap, topic, defs.sources["txns"].avro_schema())
    produce(producer, make_events(800, 20, seed=32))
    producer.flush(60)
    cut = partition_watermarks(kafka_bootstrap, topic, 0)[1] // 2
    assert cut > 1
    delete_records_before(kafka_bootstrap, topic, 0, cut)  # never archived: a gap [0, cut-1]

    state = tmp_path / "state"
    result = run_command("flows.run", *common, "--state", str(state), "--until-caught-up")

    assert gap_named(result, {0: f"[0, {cut - 1}]"}) == 0
    assert "--kafka-start earliest-available" in result.stderr  # a remedy that works
    # Refused before the plan: no view version was even started (a log that does not start at
    # offset 0 of the topic is checked for every partition before anything is applied).
    if (state / "FORMAT").is_file():
        store = ViewStore(state)
        for view in VIEWS:
            assert store.current_version(view) is None  # never switched live
            for version in store.versions(view):
                assert read_progress(store, view, version, 0).applied_offset == -1
                assert stored_partition(state, view, version, 0, 0) == (0, {})
    assert_clear_error(result)


def test_gap_after_the_archive_applies_exactly_the_archived_records(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    partitions = 2
    topic, defs, common = gap_setup(kafka_topic, kafka_bootstrap, tmp_path, partitions)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(1500, 30, seed=33)
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    produce(producer, events.slice(0, 900))
    producer.flush(60)
    archived = run_command("flows.archive", *common, "--max-age", "0")
    assert archived.returncode == 0, archived.stderr
    assert "archived 900 records" in archived.stdout
    kept = {p: partition_watermarks(kafka_bootstrap, topic, p)[1] for p in range(partitions)}
    archived_log = read_kafka_log(kafka_bootstrap, topic, schema, partitions)
    produce(producer, events.slice(900))
    producer.flush(60)
    # Retention drops part of what came after the archive, in every partition.
    cuts = {p: kept[p] + 5 for p in range(partitions)}
    for p, cut in cuts.items():
        delete_records_before(kafka_bootstrap, topic, p, cut)
    gaps = {p: f"[{kept[p]}, {cuts[p] - 1}]" for p in range(partitions)}
    newest = int(archived_log.column("ts").cast(pa.int64()).to_numpy().max())
    t = newest + 3 * MINUTE

    state = tmp_path / "state"
    for _ in range(2):  # a rerun stops the same way: the gap is never skipped
        result = run_command("flows.run", *common, "--state", str(state), "--until-caught-up")

        gap_named(result, gaps)
        store = ViewStore(state)
        for view in VIEWS:
            assert store.current_version(view) is None  # never caught up, never live
            (version,) = store.versions(view)
            for p in range(partitions):
                # Each partition applied its segments, then stopped at the gap.
                assert read_progress(store, view, version, p).applied_offset == kept[p] - 1
                count, values = stored_partition(state, view, version, p, t)
                part_log = archived_log.filter(pc.equal(archived_log.column("_partition"), p))
                assert count == kept[p]
                assert set(values) == set(part_log.column("user_id").to_pylist())
                assert_matches_oracle(defs.layouts[view], part_log, t, values)
        assert_clear_error(result)


def test_records_deleted_after_the_archive_are_no_gap(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Retention may drop records that segments already hold: the log has no gap then."""
    topic, defs, common = gap_setup(kafka_topic, kafka_bootstrap, tmp_path, partitions=1)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(600, 15, seed=34)
    producer = AvroProducer(kafka_bootstrap, topic, schema)
    produce(producer, events.slice(0, 400))
    producer.flush(60)
    archived = run_command("flows.archive", *common, "--max-age", "0")
    assert archived.returncode == 0, archived.stderr
    produce(producer, events.slice(400))
    producer.flush(60)
    full_log = read_kafka_log(kafka_bootstrap, topic, schema, 1)
    delete_records_before(kafka_bootstrap, topic, 0, 400)  # exactly the archived range

    state = tmp_path / "state"
    result = run_command("flows.run", *common, "--state", str(state), "--until-caught-up")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "applied 600 events" in result.stdout
    newest = int(full_log.column("ts").cast(pa.int64()).to_numpy().max())
    t = newest + 3 * MINUTE
    keys = sorted(set(full_log.column("user_id").to_pylist()))
    with FeatureClient(state) as client:
        for view in VIEWS:
            got = client.get_many(view, keys, at=t / 1e6)
            assert_matches_oracle(
                defs.layouts[view], full_log, t, dict(zip(keys, got, strict=True))
            )
