"""One FeatureClient shared by many threads while replays make new versions live: no read
fails, the catch-up thread survives errors and says so, and new events show up within a second.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from state.client import FeatureClient
from state.errors import ClientClosedError
from state.store import ViewStore
from tests.helpers import DAY, make_events, run_command, wait_until, write_definitions

START_US = 1_780_000_000_000_000
AT_LATER = (START_US + 30 * DAY) / 1e6  # after every event: exact, and sees them all
KEYS = [f"user{i}" for i in range(10)]


def _setup(root: Path) -> list[str]:
    features = write_definitions(root / "defs")
    pq.write_table(make_events(2000, 10, seed=11), root / "a.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    result = run_command("flows.ingest", *common, str(root / "a.parquet"))
    assert result.returncode == 0, result.stderr
    common += ["--state", str(root / "state")]
    result = run_command("flows.run", *common, "--until-caught-up")
    assert result.returncode == 0, result.stderr
    return common


def _total(client: FeatureClient) -> int:
    return sum(v["count"] for v in client.get_many("spend", KEYS, at=AT_LATER))


def test_shared_client_survives_replays_and_sees_new_events(tmp_path: Path) -> None:
    common = _setup(tmp_path)
    client = FeatureClient(tmp_path / "state", refresh_s=0.05)
    assert _total(client) == 2000
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0] * 8

    def reader(n: int) -> None:
        while not stop.is_set():
            try:
                values = client.get_many("spend", KEYS, at=AT_LATER)
                assert sum(v["count"] for v in values) >= 2000
                client.get("channels", KEYS[n])
                reads[n] += 1
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        for expected in (2, 3, 4):
            result = run_command(
                "flows.replay", *common, "--views", "spend", "--keep-versions", "1"
            )
            assert result.returncode == 0, result.stderr
            assert ViewStore(tmp_path / "state").current_version("spend") == expected
        more = make_events(300, 10, seed=12, start_us=START_US + 5 * DAY)
        pq.write_table(more, tmp_path / "b.parquet")
        result = run_command("flows.ingest", *common[:4], str(tmp_path / "b.parquet"))
        assert result.returncode == 0, result.stderr
        result = run_command("flows.run", *common, "--until-caught-up")
        assert result.returncode == 0, result.stderr
        applied = time.monotonic()
        while _total(client) != 2300 and time.monotonic() - applied < 10:
            time.sleep(0.01)
        visible_after = time.monotonic() - applied
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, f"{len(failures)} failed reads, first: {failures[0]!r}"
    assert min(reads) > 0
    with FeatureClient(tmp_path / "state") as fresh:
        assert _total(fresh) == 2300, "the writer did not apply every event"
    assert _total(client) == 2300, client.health()
    assert visible_after < 1.0, f"new events visible only after {visible_after:.2f}s"
    health = client.health()
    assert health.refreshing
    assert health.versions["spend"] == 4
    assert health.last_catch_up is not None
    assert time.time() - health.last_catch_up < 5
    client.close()
    with pytest.raises(ClientClosedError, match="closed"):
        client.get("spend", "user1")


def test_catch_up_thread_logs_and_survives_a_broken_partition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _setup(tmp_path)
    with FeatureClient(tmp_path / "state", refresh_s=0.02) as client:
        before = client.get("spend", "user1", at=AT_LATER)
        store = ViewStore(tmp_path / "state")
        vdir = store.version_dir("spend", 1)
        with caplog.at_level(logging.WARNING, logger="state.client"):
            for part in vdir.glob("p*"):
                shutil.rmtree(part)  # the primary turns into a file under the open secondary
                part.write_text("not a database")
            wait_until(
                lambda: client.health().errors > 0,
                "the catch-up thread to report the damage",
                timeout=10,
                interval=0.02,
            )
        health = client.health()
        assert health.errors > 0
        assert health.last_error
        assert health.refreshing, "the catch-up thread died"
        assert any("catch-up" in r.getMessage() for r in caplog.records)
        assert client.get("spend", "user1", at=AT_LATER) == before  # reads still served
