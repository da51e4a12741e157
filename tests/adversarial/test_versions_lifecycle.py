"""View versions under concurrent writers, replays and kills: an old-definition follower never
undoes a newer deployment, a version in use is never deleted, a killed replay's leftover is
cleaned up without costing the last good version, and a second writer is refused clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from state.store import ViewStore
from tests.e2e.test_crash import INJECT
from tests.helpers import REPO, make_events, run_command, wait_until, write_definitions

NEW_COUNT = 'count(window="45m", hop="15m")'
INJECT_REPLAY = INJECT.replace("from flows.run import main", "from flows.replay import main")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    features = write_definitions(tmp_path / "defs")
    pq.write_table(make_events(3000, 10, seed=21), tmp_path / "a.parquet")
    result = run_command(
        "flows.ingest",
        "--features",
        str(features),
        "--warehouse",
        str(tmp_path / "wh"),
        str(tmp_path / "a.parquet"),
    )
    assert result.returncode == 0, result.stderr
    return tmp_path


def _args(root: Path, features: Path) -> list[str]:
    return [
        "--features",
        str(features),
        "--warehouse",
        str(root / "wh"),
        "--state",
        str(root / "state"),
    ]


def _new_definitions(root: Path) -> Path:
    features = write_definitions(root / "defs2")
    features.write_text(features.read_text().replace('count(window="30m")', NEW_COUNT))
    return features


def _start(module: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args, "--status-interval", "60"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def follower(store_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A flows.run in follow mode over the first definitions, live on v1."""
    flow = _start("flows.run", *_args(store_dir, store_dir / "defs" / "features.py"))
    store = ViewStore(store_dir / "state", create=True)
    try:
        wait_until(
            lambda: store.current_version("spend") == 1 and flow.poll() is None,
            "the follower to make v1 live",
            interval=0.05,
        )
        yield flow
    finally:
        if flow.poll() is None:
            flow.kill()
        flow.communicate(timeout=60)


def test_old_definition_follower_stops_instead_of_undoing_a_deployment(
    store_dir: Path, follower: subprocess.Popen[str]
) -> None:
    new = _args(store_dir, _new_definitions(store_dir))
    result = run_command("flows.run", *new, "--views", "spend", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    store = ViewStore(store_dir / "state")
    assert store.current_version("spend") == 2
    _out, err = follower.communicate(timeout=60)
    assert follower.returncode != 0
    assert "the deployed definition changed (v2 is live" in err
    assert "restart it with the new definitions" in err
    assert store.current_version("spend") == 2  # never switched back
    old = run_command(
        "flows.run", *_args(store_dir, store_dir / "defs" / "features.py"), "--until-caught-up"
    )
    assert old.returncode != 0
    assert "not making v1 live: v2, a newer version, is live already" in old.stderr
    assert store.current_version("spend") == 2


def test_replay_keep_one_beside_a_writer_keeps_the_version_it_uses(
    store_dir: Path, follower: subprocess.Popen[str]
) -> None:
    args = _args(store_dir, store_dir / "defs" / "features.py")
    result = run_command("flows.replay", *args, "--views", "spend", "--keep-versions", "1")
    assert result.returncode == 0, result.stderr
    assert "kept v1: a running flows.run" in result.stdout
    store = ViewStore(store_dir / "state")
    assert store.current_version("spend") == 2
    assert (store.version_dir("spend", 1) / "layout.json").is_file()
    time.sleep(3)  # the follower notices the switch (every 2 s) and continues on v2
    assert follower.poll() is None, follower.communicate()[1]
    follower.send_signal(signal.SIGTERM)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert "continuing on it" in out
    assert "stopped by SIGTERM" in out
    result = run_command("flows.replay", *args, "--views", "spend", "--keep-versions", "1")
    assert result.returncode == 0, result.stderr
    assert store.versions("spend") == [3]  # v1 free now: removed


def test_second_writer_is_refused_with_the_holders_pid(
    store_dir: Path, follower: subprocess.Popen[str]
) -> None:
    second = run_command(
        "flows.run", *_args(store_dir, store_dir / "defs" / "features.py"), "--until-caught-up"
    )
    assert second.returncode != 0
    assert f"pid {follower.pid}" in second.stderr
    assert "holds state dir" in second.stderr
    assert "use another --state" in second.stderr
    assert "Traceback" not in second.stderr
    assert follower.poll() is None


def test_killed_replay_leftover_is_removed_not_counted(store_dir: Path) -> None:
    args = _args(store_dir, store_dir / "defs" / "features.py")
    assert run_command("flows.run", *args, "--until-caught-up").returncode == 0
    store = ViewStore(store_dir / "state")
    # The replay kills itself (SIGKILL) when the first partition of v2 has caught up: v2 is
    # half-built, whatever the machine's speed.
    killed = subprocess.run(
        [sys.executable, "-c", INJECT_REPLAY, "spend/v2/caught_up/p*", *args, "--views", "spend"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert store.current_version("spend") == 1, "the replay finished before it was killed"
    assert store.versions("spend") == [1, 2]
    result = run_command("flows.replay", *args, "--views", "spend", "--keep-versions", "2")
    assert result.returncode == 0, result.stderr
    assert store.current_version("spend") == 3
    assert store.versions("spend") == [1, 3]  # the half-built v2 went, the good v1 stayed
    assert "removed v2" in result.stdout
