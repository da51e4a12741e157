"""Onboarding a topic already past retention (issue 14 item 7), with the real broker: a fresh
state and warehouse on a topic whose low watermark is above 0 stopped with "gap [0, 2074]" for
partition 0 only, and its remedies did not work. Now the error names every partition and
`flows.run --kafka-start earliest-available|<ISO time>` starts the log there, recording the
skipped offsets as a gap in the warehouse manifest, so later runs, replays and archives agree."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka import AvroProducer
from connectors.kafka_admin import partition_watermarks
from connectors.segments import Warehouse
from tests.conftest import TopicFactory
from tests.helpers import TXN_SCHEMA, make_events, run_command, write_definitions

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, n: int, seed: int) -> None:
    producer = AvroProducer(bootstrap, topic, TXN_SCHEMA)
    producer.produce(make_events(n, 20, seed=seed).to_pylist(), key_field="user_id")
    producer.flush()


def run(features: Path, tmp_path: Path, bootstrap: str, *extra: str, state: str = "state") -> Any:
    return run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / state),
        "--kafka",
        bootstrap,
        "--until-caught-up",
        *extra,
    )


def test_a_topic_past_retention_is_onboarded_with_earliest_available(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(2)
    features = write_definitions(tmp_path / "defs", partitions=2, topic=topic)
    produce(kafka_bootstrap, topic, 600, seed=41)
    ends = {p: partition_watermarks(kafka_bootstrap, topic, p)[1] for p in range(2)}
    cuts = {p: ends[p] // 3 for p in range(2)}
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    gone = [TopicPartition(topic, p, cut) for p, cut in cuts.items()]
    for future in admin.delete_records(gone).values():  # what retention does
        future.result(30)
    kept = sum(ends[p] - cuts[p] for p in range(2))

    refused = run(features, tmp_path, kafka_bootstrap)

    assert refused.returncode == 2, refused.stdout + refused.stderr
    for p in range(2):  # every partition named, with its range
        assert f"partition {p} [0, {cuts[p] - 1}]" in refused.stderr
    assert "--kafka-start earliest-available" in refused.stderr

    started = run(features, tmp_path, kafka_bootstrap, "--kafka-start", "earliest-available")

    assert started.returncode == 0, started.stdout + started.stderr
    assert f"applied {kept:,} events" in started.stdout
    wh = Warehouse(tmp_path / "wh")
    for p in range(2):
        (gap,) = wh.gaps("txns", p)
        assert (gap.first_offset, gap.last_offset) == (0, cuts[p] - 1)
        assert "before retention at onboarding" in gap.reason
        assert wh.kafka_base("txns", p) == 0

    # The recorded start serves every later run: a restart, a new state (a replay), an archive.
    again = run(features, tmp_path, kafka_bootstrap)
    fresh = run(features, tmp_path, kafka_bootstrap, state="state-2")
    archived = run_command(
        "flows.archive",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--kafka",
        kafka_bootstrap,
        "--max-age",
        "0",
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert f"applied {kept:,} events" in fresh.stdout
    assert archived.returncode == 0, archived.stdout + archived.stderr
    assert f"archived {kept:,} records" in archived.stdout
    from_warehouse = run_command(
        "flows.run",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "state-3"),
        "--until-caught-up",
    )
    assert from_warehouse.returncode == 0, from_warehouse.stdout + from_warehouse.stderr
    assert f"applied {kept:,} events" in from_warehouse.stdout


def test_a_log_can_start_at_a_time(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(1)
    features = write_definitions(tmp_path / "defs", partitions=1, topic=topic)
    produce(kafka_bootstrap, topic, 50, seed=42)
    time.sleep(1.1)
    at = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    produce(kafka_bootstrap, topic, 30, seed=43)

    result = run(features, tmp_path, kafka_bootstrap, "--kafka-start", at)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "applied 30 events" in result.stdout
    (gap,) = Warehouse(tmp_path / "wh").gaps("txns", 0)
    assert (gap.first_offset, gap.last_offset) == (0, 49)
    assert at in gap.reason
    bad = run(features, tmp_path, kafka_bootstrap, "--kafka-start", "yesterday", state="s2")
    assert bad.returncode == 2
    assert "--kafka-start 'yesterday'" in bad.stderr


def test_a_gap_after_the_archive_can_be_recorded_and_passed(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The remedy the mid-log gap error gives works: the lost range becomes a recorded gap."""
    topic = kafka_topic(1)
    features = write_definitions(tmp_path / "defs", partitions=1, topic=topic)
    produce(kafka_bootstrap, topic, 100, seed=44)
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    archive = [*common, "--kafka", kafka_bootstrap, "--max-age", "0"]
    assert run_command("flows.archive", *archive).returncode == 0
    produce(kafka_bootstrap, topic, 100, seed=45)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 130)]).values():
        future.result(30)

    stopped = run(features, tmp_path, kafka_bootstrap)
    passed = run(features, tmp_path, kafka_bootstrap, "--kafka-start", "earliest-available")

    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "--kafka-start earliest-available" in stopped.stderr
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "applied 70 events" in passed.stdout  # the stopped run applied the 100 archived
    (gap,) = Warehouse(tmp_path / "wh").gaps("txns", 0)
    assert (gap.first_offset, gap.last_offset) == (100, 129)
    assert "never archived" in gap.reason
    assert run_command("flows.archive", *archive).returncode == 0  # archive goes on after it
