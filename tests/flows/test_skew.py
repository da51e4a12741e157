"""flows.skew on a live Kafka deployment: reads logged while events flow are recomputed offline;
every mismatch on a healthy view is explained (arrived after the read, not yet applied), and a
view whose stored state the test altered is found (unexplained mismatches on its keys only)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Rdict

from connectors.kafka import AvroProducer
from connectors.partitioner import partition_for
from connectors.segments import Warehouse
from flows.governance.skew import ARRIVED_LATE, NOT_APPLIED, UNEXPLAINED
from flows.skew import main as skew_main
from flows.skew import report_lines, run_skew
from flows.snapshot import read_log
from flows.spec import load_definitions
from state.client import FeatureClient
from state.codec import encode_key
from state.servedlog import ServedLog
from state.store import ViewStore, partition_dir, rocks_options
from tests.conftest import TopicFactory
from tests.helpers import REPO, SCHEMA_JSON, wait_until, write_module

AT = 1_780_000_000 + 4 * 86_400  # after the newest event of the deployment fixture

DEFS = """
from flows.spec import FeatureView, Source, count, last, sum

txns = Source(name="txns", schema="txn.avsc", key="user_id", timestamp="ts", partitions=2,
              topic={topic!r})
FEATURES = [count(window="30m"), sum("amount", window="2h", hop="10m"), last("channel")]
spend = FeatureView(name="spend", source=txns, features=FEATURES)
damaged = FeatureView(name="damaged", source=txns, features=FEATURES)
"""
KEYS = [f"user{i}" for i in range(8)]
VIEWS = {"spend", "damaged"}


@pytest.mark.kafka
def test_the_log_read_for_a_snapshot_waits_for_the_kafka_tail(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Kafka reads never block: a first read that finds nothing fetched yet is not the end."""
    topic = kafka_topic(2)
    (tmp_path / "txn.avsc").write_text(SCHEMA_JSON)
    (tmp_path / "features.py").write_text(DEFS.format(topic=topic))
    source = load_definitions(tmp_path / "features.py").sources["txns"]
    records = [
        {"user_id": k, "ts": datetime.now(UTC), "amount": 1.0, "channel": "web"} for k in KEYS
    ]
    producer = AvroProducer(kafka_bootstrap, topic, source.avro_schema())
    producer.produce(records, key_field="user_id")
    producer.flush()
    logs = read_log(source, Warehouse(tmp_path / "wh"), kafka_bootstrap)
    assert sum(t.num_rows for t in logs) == len(KEYS)


def produce_live(
    bootstrap: str, topic: str, schema: dict, seconds: float, done: threading.Event
) -> None:
    """Events stamped with the wall clock, a few every 20 ms, for `seconds`."""
    producer = AvroProducer(bootstrap, topic, schema)
    rng = np.random.default_rng(5)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        records = [
            {"user_id": KEYS[int(k)], "ts": datetime.now(UTC), "amount": float(a),
             "channel": "web" if a > 20 else "pos"}
            for k, a in zip(rng.integers(0, len(KEYS), 3), rng.uniform(1, 40, 3), strict=True)
        ]  # fmt: skip
        producer.produce(records, key_field="user_id")
        producer.flush()
        time.sleep(0.02)
    done.set()


def wait_for_views(state: Path, timeout: float = 60) -> None:
    wait_until(
        lambda: (state / "FORMAT").is_file() and set(ViewStore(state).views()) == VIEWS,
        f"flows.run to make the views {sorted(VIEWS)} in {state}",
        timeout=timeout,
    )


def swap_two_entities(state: Path) -> list[str]:
    """Alter the stored state of view 'damaged': two keys of one partition swap their tiles."""
    p = partition_for(KEYS[0], 2)
    pair = [k for k in KEYS if partition_for(k, 2) == p][:2]
    assert len(pair) == 2
    path = partition_dir(ViewStore(state).version_dir("damaged", 1), p)
    db = Rdict(str(path), rocks_options())
    try:
        a, b = (db[encode_key(k)] for k in pair)
        db[encode_key(pair[0])], db[encode_key(pair[1])] = b, a
    finally:
        db.close()
    return pair


@pytest.mark.kafka
def test_live_reads_are_explained_and_an_altered_view_is_found(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(2)
    (tmp_path / "txn.avsc").write_text(SCHEMA_JSON)
    features = tmp_path / "features.py"
    features.write_text(DEFS.format(topic=topic))
    schema = load_definitions(features).sources["txns"].avro_schema()
    wh, state = tmp_path / "wh", tmp_path / "state"
    flow = subprocess.Popen(
        [sys.executable, "-m", "flows.run", "--features", str(features), "--warehouse", str(wh),
         "--state", str(state), "--kafka", kafka_bootstrap, "--status-interval", "60"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_views(state)
        done = threading.Event()
        producer = threading.Thread(
            target=produce_live, args=(kafka_bootstrap, topic, schema, 4.0, done)
        )
        producer.start()
        with FeatureClient(state, served_log=ServedLog(wh, flush_s=0.2)) as client:
            while not done.is_set():  # live reads as of now, while events arrive
                client.get_many("spend", KEYS)
                client.get_many("damaged", KEYS)
                time.sleep(0.05)
        producer.join()
        time.sleep(2.0)  # the flow applies the tail
    finally:
        flow.send_signal(signal.SIGINT)
        _out, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err
    pair = swap_two_entities(state)
    at = datetime.now(UTC)
    with FeatureClient(state, served_log=ServedLog(wh)) as client:
        client.get_many("spend", KEYS, at=at)
        client.get_many("damaged", KEYS, at=at)

    report = run_skew(features, wh, kafka_bootstrap, state, examples=50)
    assert report.compared > 100
    by_view: dict[str, dict[str, int]] = {}
    for f in report.features:
        assert f.rows > 0
        for why, n in f.reasons.items():
            by_view.setdefault(f.view, {}).setdefault(why, 0)
            by_view[f.view][why] += n
    shown = "\n".join(report_lines(report))
    assert set(by_view.get("spend", {})) <= {ARRIVED_LATE, NOT_APPLIED}, shown  # all explained
    assert by_view["damaged"][UNEXPLAINED] > 0  # the altered view is found
    unexplained = [m for f in report.features for m in f.examples if m.reason == UNEXPLAINED]
    assert unexplained
    assert {m.view for m in unexplained} == {"damaged"}
    assert {m.key for m in unexplained} <= set(pair)
    assert {m.key for m in unexplained} == set(pair)
    spend_exact = sum(f.exact + f.within_tolerance for f in report.features if f.view == "spend")
    assert spend_exact > 0
    args = ["--features", str(features), "--warehouse", str(wh), "--state", str(state),
            "--kafka", kafka_bootstrap]  # fmt: skip
    assert skew_main(args) == 3  # some mismatch is unexplained


ON_DEMAND = """
import pyarrow as pa
import pyarrow.compute as pc
from flows.spec import FeatureService, RequestSource, on_demand

payment = RequestSource(name="payment", schema={{"amount": "double"}})

@on_demand(sources=[payment, spend[["amount_mean_1d"]]], outputs={{"ratio": "double"}})
def signals(rows):
    return {{"ratio": pc.multiply(rows.column("amount"), {factor})}}

scored = FeatureService(name="scored", features=[spend[["count_30m"]], signals])
"""


def test_service_reads_compare_their_on_demand_outputs(deployment: Path, tmp_path: Path) -> None:
    """Embedded (no Kafka): service reads are recomputed through the service snapshot; the same
    code gives equal outputs, and different on-demand code offline is found."""
    wh, state = tmp_path / "wh", deployment / "state"
    shutil.copytree(deployment / "wh", wh)
    base = (deployment / "defs" / "features.py").read_text()
    served_defs = write_module(tmp_path / "served", base + ON_DEMAND.format(factor=2.0))
    rows = [{"user_id": f"user{i}", "amount": float(i)} for i in range(10)]
    with FeatureClient(state, features=served_defs, served_log=ServedLog(wh)) as client:
        client.get_service_many("scored", rows, at=AT)
    same = run_skew(served_defs, wh, None, state)
    outputs = {(f.view, f.feature): f for f in same.features}
    ratio = outputs["scored", "signals__ratio"]
    assert ratio.rows == 10
    assert ratio.exact + ratio.within_tolerance == 10
    assert outputs["spend", "count_30m"].rows == 10  # the view part, through the view
    assert same.unexplained == 0
    later = run_skew(served_defs, wh, None, state, since=datetime(2100, 1, 1, tzinfo=UTC))
    assert later.compared == 0  # --since: only reads served from then on
    changed = write_module(tmp_path / "changed", base + ON_DEMAND.format(factor=3.0))
    other = run_skew(changed, wh, None, state)
    ratio = {(f.view, f.feature): f for f in other.features}["scored", "signals__ratio"]
    assert ratio.mismatches == 9  # amount 0 gives 0 either way
    assert ratio.reasons == {UNEXPLAINED: 9}
