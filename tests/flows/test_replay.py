"""Backfill as replay: new and changed views get their history through the same dataflow, as a
new version beside the live one, switched atomically; a following flow continues on it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from state.client import FeatureClient
from state.store import ViewStore
from tests.helpers import DAY, REPO, make_events, run_command, wait_until, write_definitions

AT = (1_780_000_000_000_000 + 10 * DAY) / 1e6


def ingest(root: Path, features: Path, table: pa.Table, name: str) -> None:
    pq.write_table(table, root / name)
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        str(root / name),
    )
    assert result.returncode == 0, result.stderr


def counts(state: Path, view: str, keys: list[str]) -> list[int]:
    with FeatureClient(state) as client:
        return [v["count"] for v in client.get_many(view, keys, at=AT)]


def test_replay_builds_a_new_version_and_switches(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs")
    ingest(tmp_path, features, make_events(3000, 10, seed=3), "a.parquet")
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "state"),
    ]
    assert run_command("flows.run", *common, "--until-caught-up").returncode == 0
    keys = [f"user{i}" for i in range(10)]
    before = counts(tmp_path / "state", "spend", keys)
    for expected_version in (2, 3, 4):
        result = run_command("flows.replay", *common, "--views", "spend", "--keep-versions", "2")
        assert result.returncode == 0, result.stderr
        store = ViewStore(tmp_path / "state")
        assert store.current_version("spend") == expected_version
        assert store.current_version("channels") == 1  # not named: untouched
        assert store.versions("spend") == [expected_version - 1, expected_version]
        assert counts(tmp_path / "state", "spend", keys) == before


def test_changed_definition_is_backfilled_beside_the_live_version(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs")
    ingest(tmp_path, features, make_events(3000, 10, seed=4), "a.parquet")
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "state"),
    ]
    assert run_command("flows.run", *common, "--until-caught-up").returncode == 0
    features.write_text(
        features.read_text().replace('count(window="30m")', 'count(window="45m", hop="15m")')
    )
    result = run_command("flows.run", *common, "--until-caught-up")
    assert result.returncode == 0, result.stderr
    assert "view 'spend' v2 (new version, live when caught up)" in result.stdout
    assert "view 'channels' v1 (live)" in result.stdout
    assert ViewStore(tmp_path / "state").current_version("spend") == 2
    with FeatureClient(tmp_path / "state") as client:
        assert "count_45m" in client.get("spend", "user1", at=AT)


def test_following_flow_continues_on_the_replayed_version(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs")
    ingest(tmp_path, features, make_events(2000, 10, seed=5), "a.parquet")
    common = [
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        "--state",
        str(tmp_path / "state"),
    ]
    flow = subprocess.Popen(
        [sys.executable, "-m", "flows.run", *common, "--status-interval", "60"],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    keys = [f"user{i}" for i in range(10)]
    try:
        state = tmp_path / "state"
        wait_until(
            lambda: (
                (state / "views" / "spend" / "CURRENT").exists()
                and sum(counts(state, "spend", keys)) == 2000
            ),
            "the flow to apply the first 2000 events",
        )
        result = run_command("flows.replay", *common, "--views", "spend")
        assert result.returncode == 0, result.stderr
        ingest(
            tmp_path,
            features,
            make_events(500, 10, seed=6, start_us=1_780_000_000_000_000 + 4 * DAY),
            "b.parquet",
        )
        wait_until(  # on the new version
            lambda: sum(counts(state, "spend", keys)) == 2500, "the flow to apply 500 more events"
        )
        assert ViewStore(state).current_version("spend") == 2
    finally:
        flow.send_signal(signal.SIGINT)
        out, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err
    assert "continuing on it" in out
