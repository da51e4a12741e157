"""The warehouse on the S3 test server (scripts/s3): conditional manifest commits under
concurrent writers, the commands end to end on s3:// equal to a local warehouse, bucket
creation, the --warehouse-endpoint flag, the Kafka dead-letter progress on an object store."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.deadletters import sent_offsets
from connectors.envelope import DeadLetter
from connectors.errors import ManifestConflictError
from connectors.objectstore import S3Store, VersionedDocument, open_store, with_endpoint
from connectors.segment_writer import LogTransaction
from connectors.segments import Warehouse
from state.client import FeatureClient
from tests.conftest import S3_TEST_BUCKET
from tests.helpers import REPO, make_events, write_definitions

US = pa.timestamp("us", tz="UTC")


def log_rows(first: int, n: int, partition: int = 0) -> pa.Table:
    offsets = np.arange(first, first + n, dtype=np.int64)
    return pa.table(
        {
            "user_id": [f"u{o % 7}" for o in offsets],
            "ts": pa.array(1_700_000_000_000_000 + offsets * 1000).cast(US),
            "_offset": offsets,
            "_partition": pa.array(np.full(n, partition, dtype=np.int32)),
            "_arrival": pa.array(np.zeros(n, dtype=np.int64)).cast(US),
        }
    )


def add(tx: LogTransaction, n: int = 5, partition: int = 0) -> None:
    first = tx.next_offset(partition)
    tx.append(partition, log_rows(first, n, partition), fingerprint="ab", ts_column="ts")


def offsets(wh: Warehouse, partition: int = 0) -> list[int]:
    return [o for b in wh.read("tx", partition) for o in b.column("_offset").to_pylist()]


def test_two_writers_of_one_manifest_version_one_wins_the_other_gets_a_clear_error(
    s3_warehouse: str,
) -> None:
    Warehouse(s3_warehouse).append("tx", 0, log_rows(0, 5), fingerprint="ab", ts_column="ts")
    both_read = threading.Barrier(2)
    outcome: dict[int, str] = {}

    def writer(i: int) -> None:
        try:
            with Warehouse(s3_warehouse).transaction("tx") as tx:
                add(tx, partition=i)  # different partitions: no offset clash, only the commit
                both_read.wait(timeout=30)
            outcome[i] = "committed"
        except ManifestConflictError as exc:
            outcome[i] = str(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [i for i, o in outcome.items() if o == "committed"]
    loser = 1 - winner
    assert "another writer committed manifest version 2" in outcome[loser]
    assert "run it again on the new manifest" in outcome[loser]
    wh = Warehouse(s3_warehouse)
    assert wh.next_offset("tx", loser) == (5 if loser == 0 else 0)  # nothing of the loser
    assert wh.store.list(f"tx/p{loser:04d}") == ([] if loser == 1 else wh.store.list("tx/p0000"))
    wh.retrying("tx", lambda tx: add(tx, partition=loser))  # the retry commits on the new one
    assert offsets(wh, 0) == list(range(10))
    assert offsets(wh, 1) == list(range(5))


def test_writers_racing_for_the_same_offsets_lose_nothing_and_double_nothing(
    s3_warehouse: str,
) -> None:
    """An append with fixed offsets that lost the race is refused on the new manifest."""
    table = log_rows(0, 5)
    results: list[str] = []

    def writer() -> None:
        try:
            Warehouse(s3_warehouse).append("tx", 0, table, fingerprint="ab", ts_column="ts")
            results.append("ok")
        except Exception as exc:  # the loser's error is part of the outcome checked below
            results.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1
    assert all("must be contiguous from 5" in r for r in results if r != "ok")
    wh = Warehouse(s3_warehouse)
    assert offsets(wh) == list(range(5))
    assert len(wh.segments("tx", 0)) == 1


def test_a_reused_pruned_version_number_is_withdrawn(s3_warehouse: str) -> None:
    doc = VersionedDocument(open_store(s3_warehouse), "doc", keep=2)
    assert doc.read() == (0, None)
    assert doc.commit(0, b"1")
    slow_reader_version, _ = doc.read()  # version 1
    for n in range(1, 5):
        assert doc.commit(n, str(n + 1).encode())
    assert doc.versions() == [4, 5]  # 1..3 pruned
    assert not doc.commit(slow_reader_version, b"stale")  # version 2 was free again: withdrawn
    assert doc.versions() == [4, 5]
    assert doc.read() == (5, b"5")


def test_a_writing_command_creates_a_missing_bucket(s3_endpoint: str) -> None:
    bucket = f"featureflow-new-{uuid.uuid4().hex[:8]}"
    wh = Warehouse(f"s3://{bucket}/wh")
    wh.append("tx", 0, log_rows(0, 3), fingerprint="ab", ts_column="ts")
    assert offsets(Warehouse(f"s3://{bucket}/wh")) == [0, 1, 2]
    store = wh.store
    assert isinstance(store, S3Store)
    assert bucket in [b["Name"] for b in store.client().list_buckets()["Buckets"]]


def test_the_endpoint_flag_goes_into_the_uri() -> None:
    uri = with_endpoint("s3://b/p", "http://127.0.0.1:9444")
    assert uri == "s3://b/p?endpoint_override=http%3A%2F%2F127.0.0.1%3A9444"
    assert with_endpoint("data/wh", "http://x") == "data/wh"
    store = open_store(uri)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint) == ("b", "p", "http://127.0.0.1:9444")


def test_dead_letter_progress_on_an_object_store_loses_no_mark(s3_warehouse: str) -> None:
    def mark(first: int) -> None:
        letters = [DeadLetter("r", 0, o, b"x") for o in range(first, first + 20, 2)]
        sent_offsets(s3_warehouse, "tx").advance(letters)

    threads = [threading.Thread(target=mark, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sent_offsets(s3_warehouse, "tx").delivered()
    marked = {o for a, b in done[0] for o in range(a, b + 1)}
    assert marked == {o for i in range(4) for o in range(i, i + 20, 2)}


def _command(module: str, *args: str, env: dict[str, str]) -> str:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{module}: {result.stderr[-3000:]}"
    return result.stdout


def _pipeline(root: Path, warehouse: list[str], env: dict[str, str]) -> dict[str, Any]:
    """ingest -> run -> snapshot -> replay; returns the snapshot and every view's reads."""
    features = write_definitions(root / "defs")
    pq.write_table(make_events(3000, 40, seed=7), root / "events.parquet")
    common = ["--features", str(features), *warehouse]
    _command("flows.ingest", *common, str(root / "events.parquet"), env=env)
    state = ["--state", str(root / "state")]
    _command("flows.run", *common, *state, "--until-caught-up", env=env)
    keys = [f"user{k}" for k in range(40)]
    spine = pa.table(
        {
            "user_id": keys,
            "ts": pa.array([1_780_100_000_000_000] * 40, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(spine, root / "spine.parquet")
    out = root / "snap.parquet"
    _command(
        "flows.snapshot",
        *common,
        "--spine",
        str(root / "spine.parquet"),
        "--out",
        str(out),
        env=env,
    )
    _command("flows.replay", *common, *state, "--views", "spend", env=env)
    with FeatureClient(root / "state") as client:
        reads = {v: client.get_many(v, keys) for v in ("spend", "channels")}
    return {"snapshot": pq.read_table(out).to_pylist(), "reads": reads}


def test_ingest_run_snapshot_replay_on_s3_equal_a_local_warehouse(
    tmp_path: Path, s3_warehouse: str, s3_endpoint: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    local = _pipeline(tmp_path / "local", ["--warehouse", str(tmp_path / "wh")], env)
    # The endpoint from the flag alone (no AWS_ENDPOINT_URL in the environment).
    no_endpoint = {k: v for k, v in env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    flag = ["--warehouse", s3_warehouse, "--warehouse-endpoint", s3_endpoint]
    remote = _pipeline(tmp_path / "s3", flag, no_endpoint)
    assert remote == local
    assert local["snapshot"]
    assert any(r["spend__count"] for r in local["snapshot"])
    wh = Warehouse(with_endpoint(s3_warehouse, s3_endpoint))
    assert sum(s.rows for p in range(3) for s in wh.segments("txns", p)) > 0
    assert s3_warehouse.startswith(f"s3://{S3_TEST_BUCKET}/")
