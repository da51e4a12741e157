"""Issue 12: a cluster of hosts, simulated here. Two bytewax processes of flows.run, each with
its own state directory (as on two hosts), one S3 warehouse, one Kafka topic of 4 partitions.
Process 0 is killed with kill -9, its host's state is lost, it comes back from its checkpoint
(flows.checkpoint --process-id 0, flows.run --restore) and catches up; the union of the two
state directories equals a one-process run and the DuckDB oracle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.partitioner import partitions_for
from flows.cluster import (
    Cluster,
    Publication,
    lowest_position,
    owner_process,
    publish,
    read_publications,
)
from flows.spec import load_definitions
from state.client import FeatureClient
from state.store import (
    NOTHING_APPLIED,
    LogPosition,
    ViewStore,
    partition_dir,
    read_partition_progress,
)
from tests.conftest import TopicFactory
from tests.e2e.test_e2e_kafka import produce, read_topic_log
from tests.helpers import (
    MINUTE,
    REPO,
    cluster_addresses,
    make_events,
    run_command,
    wait_until,
    write_definitions,
)
from tests.oracle import mismatches, oracle_values, same

PARTITIONS = 4
VIEWS = ("spend", "channels", "by_channel")
BY_CHANNEL = """
by_channel = FeatureView(name="by_channel", source=txns, key="channel", features=[
    count(window="1h"), sum("amount", window="1d"), last("user_id"),
])
"""  # keyed by another column: every partition sends its events to every shard, across hosts


def ok(module: str, *args: str) -> str:
    result = run_command(module, *args)
    assert result.returncode == 0, f"{module}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


def start(
    common: list[str], state: Path, process: int, addresses: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    args = [*common, "--state", str(state), "--addresses", addresses, "--separate-state"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.run", *args, "--process-id", str(process), *extra],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> list[str]:
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=180) == 0, log.read_text()[-4000:]
    return [log.read_text() for log in logs]


def applied_offset(state: Path, view: str, shard: int) -> int:
    store = ViewStore(state, create=False)
    version = store.current_version(view)
    if version is None:
        return -1
    return read_partition_progress(
        partition_dir(store.version_dir(view, version), shard)
    ).applied_offset


def topic_ends(bootstrap: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends"})
    try:
        return [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(PARTITIONS)
        ]
    finally:
        consumer.close()


def union_reads(states: list[Path], view: str, keys: list[str], at_us: int) -> list[dict[str, Any]]:
    """Each key read from the state directory of the process that owns its shard:
    process = murmur2(key) % partitions % processes (flows.cluster)."""
    shards = partitions_for(pa.array(keys), PARTITIONS).tolist()
    owners = [owner_process(s, len(states)) for s in shards]
    out: list[dict[str, Any]] = [{} for _ in keys]
    for process, state in enumerate(states):
        mine = [i for i, o in enumerate(owners) if o == process]
        with FeatureClient(state) as client:
            for i, values in zip(
                mine, client.get_many(view, [keys[i] for i in mine], at=at_us / 1e6), strict=True
            ):
                out[i] = values
    return out


@pytest.mark.kafka
def test_two_hosts_one_killed_and_restored_from_its_checkpoint_equal_one_process(
    kafka_bootstrap: str, kafka_topic: TopicFactory, s3_warehouse: str, tmp_path: Path
) -> None:
    topic = kafka_topic(PARTITIONS)
    features = write_definitions(tmp_path / "defs", partitions=PARTITIONS, topic=topic)
    features.write_text(features.read_text() + BY_CHANNEL)
    defs = load_definitions(features)
    schema = defs.sources["txns"].avro_schema()
    events = make_events(6000, 80, seed=12)
    common = ["--features", str(features), "--warehouse", s3_warehouse, "--kafka", kafka_bootstrap]
    logs = tmp_path / "logs"
    logs.mkdir()
    states = [tmp_path / "host0", tmp_path / "host1"]

    produce(kafka_bootstrap, topic, schema, events.slice(0, 2000))
    assert "archived 2,000 records" in ok("flows.archive", *common, "--max-age", "0")
    produce(kafka_bootstrap, topic, schema, events.slice(2000, 1000))

    # Phase 1: the cluster applies the log as it stands; each host checkpoints its shards.
    outs = run_cluster(common, states, logs / "first", "--until-caught-up")
    assert sum(applied(out) for out in outs) == 3000  # each event applied by one process
    for i in (0, 1):  # a host holds exactly the shards it owns: s % 2 == i
        shards = sorted(p.name for p in ViewStore(states[i]).version_dir("spend", 1).glob("p*"))
        assert shards == [f"p{s:04d}" for s in range(PARTITIONS) if s % 2 == i]
        out = ok(
            "flows.checkpoint",
            *("--warehouse", s3_warehouse, "--state", str(states[i]), "--process-id", str(i)),
        )
        assert out.count("checkpoint ") == len(VIEWS)
    produce(kafka_bootstrap, topic, schema, events.slice(3000, 1000))
    run_cluster(common, states, logs / "second", "--until-caught-up")  # past the checkpoints

    # Phase 2: following Kafka (each host publishes positions past its checkpoint); once host
    # 0 has applied what came since, kill -9 it.
    produce(kafka_bootstrap, topic, schema, events.slice(4000, 1000))
    ends = topic_ends(kafka_bootstrap, topic)
    addresses = cluster_addresses(2)
    follow = [logs / "follow0.txt", logs / "follow1.txt"]
    procs = [start(common, states[i], i, addresses, follow[i]) for i in (0, 1)]
    try:
        wait_until(
            lambda: applied_offset(states[0], "spend", 0) + 1 >= ends[0],
            "host 0 to apply",
            timeout=90,
            interval=0.2,
        )
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(timeout=30) == -signal.SIGKILL
        # bytewax cluster semantics: a process cannot go on without its peers; the survivor
        # panics on the lost connection and exits: the whole cluster is down.
        assert procs[1].wait(timeout=60) != 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "a bytewax cluster stops as a whole" in follow[1].read_text()

    # Host 0 is gone with its disk; more events arrive meanwhile. It comes back on an empty
    # state directory restored from its checkpoint. Host 1 starts first and publishes its
    # positions while host 0's publication is still the one from before the kill (past the
    # checkpoint): the cluster must resume from the restored host's new, older one.
    produce(kafka_bootstrap, topic, schema, events.slice(5000))
    states[0] = tmp_path / "host0-new"
    addresses = cluster_addresses(2)
    last = [logs / "last0.txt", logs / "last1.txt"]
    p1 = start(common, states[1], 1, addresses, last[1], "--until-caught-up")
    wait_until(
        lambda: "view 'channels'" in last[1].read_text(),
        "host 1 to plan",
        timeout=90,
        interval=0.2,
    )
    p0 = start(common, states[0], 0, addresses, last[0], "--until-caught-up", "--restore")
    outs = finish([p0, p1], last)
    assert "restored view 'spend'" in outs[0]
    assert "restored view 'channels'" in outs[0]
    assert "restored view 'by_channel'" in outs[0]
    # Kafka still holds every offset (archiving copies): the whole log, for the oracle.
    log = read_topic_log(kafka_bootstrap, topic, schema, PARTITIONS, tmp_path / "no-warehouse")
    assert log.num_rows == 6000
    own = sum(1 for p in log.column("_partition").to_pylist() if owner_process(p, 2) == 0)
    assert records_read(outs[0]) < own  # resumed from its checkpoint, not from the start

    ok("flows.run", *common, "--state", str(tmp_path / "single"), "--until-caught-up")
    assert_union_equals_one_process(defs, states, tmp_path / "single", log)


def run_cluster(common: list[str], states: list[Path], logs: Path, *extra: str) -> list[str]:
    addresses = cluster_addresses(len(states))
    paths = [logs.with_name(f"{logs.name}{i}.txt") for i in range(len(states))]
    procs = [start(common, s, i, addresses, paths[i], *extra) for i, s in enumerate(states)]
    return finish(procs, paths)


def applied(out: str) -> int:
    return int(out.split("applied ")[1].split(" events")[0].replace(",", ""))


def records_read(out: str) -> int:
    return int(out.split(" records read")[0].rsplit("from ", 1)[1].replace(",", ""))


def assert_union_equals_one_process(
    defs: Any, states: list[Path], single: Path, events: pa.Table
) -> None:
    at_us = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + 3 * MINUTE
    for view in VIEWS:
        layout = defs.layouts[view]
        column = layout.key_columns[0]
        keys = sorted({k for k in events.column(column).to_pylist() if k is not None})
        union = union_reads(states, view, keys, at_us)
        with FeatureClient(single) as client:
            one = client.get_many(view, keys, at=at_us / 1e6)
        problems = [
            f"{view} {k} {f.name}: {u[f.name]!r} != {o[f.name]!r}"
            for k, u, o in zip(keys, union, one, strict=True)
            for f in layout.features
            if f.agg != "percentile" and not same(o[f.name], u[f.name])
        ]
        assert problems == [], problems[:10]
        if layout.rekeyed:
            continue  # one process's re-keyed views meet the oracle in test_rekeyed_views.py
        spine = pa.table({"row": range(len(keys)), "k": keys, "t": [at_us] * len(keys)})
        assert mismatches(layout, oracle_values(layout, events, spine), union) == []


def test_shard_owners_and_the_lowest_published_position(tmp_path: Path) -> None:
    """Shard s lives on process s % processes; a partition resumes at the lowest position of
    every process, and a missing publication or one of other view versions means the start."""
    assert [owner_process(s, 2) for s in range(5)] == [0, 1, 0, 1, 0]
    assert [Cluster(1, 2, separate_state=True).state_shards(4)] == [[1, 3]]
    assert Cluster(1, 2).state_shards(4) == [0, 1, 2, 3]  # one shared state directory
    warehouse = tmp_path / "wh"
    versions = {"spend": 2}
    cluster = Cluster(0, 2, separate_state=True)
    publish(warehouse, "txns", cluster, Publication(0, versions, {0: LogPosition(40, 7)}))
    assert (
        lowest_position(read_publications(warehouse, "txns", versions, 2), versions, 0)
        == NOTHING_APPLIED
    )
    publish(warehouse, "txns", cluster, Publication(1, versions, {0: LogPosition(30, 5)}))
    found = read_publications(warehouse, "txns", versions, 2)
    assert lowest_position(found, versions, 0) == LogPosition(30, 5)
    assert lowest_position(found, versions, 1) == NOTHING_APPLIED  # nobody applied any of it
    assert lowest_position(found, {"spend": 3}, 0) == NOTHING_APPLIED
    no_shards = Publication(2, versions, {})  # a third process that owns no shard
    assert lowest_position([*found, no_shards], versions, 0) == LogPosition(30, 5)
    other = Publication(1, {"channels": 1}, {0: LogPosition(5, 1)})  # another deployment's
    publish(warehouse, "txns", cluster, other)
    assert read_publications(warehouse, "txns", versions, 2) == found
    [mine] = [f for f in warehouse.rglob("h1.json") if b'"spend"' in f.read_bytes()]
    mine.write_bytes(b"{not json")  # a torn or foreign object: its partitions from the start
    assert read_publications(warehouse, "txns", versions, 2)[1] is None
