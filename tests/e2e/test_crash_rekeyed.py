"""Issue 10: kill -9 of a deployment with re-keyed views (by another column, by a tuple, by a
derived column) at several points, then a restart, gives the views of an uninterrupted run:
1 worker, 2 workers, and a cluster of 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.spec import load_definitions
from state.client import FeatureClient
from state.codec import KEY_SEPARATOR, decode_key
from state.layout import ViewLayout
from state.store import ViewStore, iter_entities, partition_dir, peek
from tests.e2e.test_crash import KillPoint, crash_and_recover
from tests.e2e.test_rekeyed_views import REKEYED, VIEWS
from tests.helpers import (
    MINUTE,
    REPO,
    cluster_addresses,
    make_events,
    run_command,
    write_definitions,
)
from tests.oracle import same

pytestmark = pytest.mark.slow
PARTITIONS = 3
KILLS = [
    KillPoint(0.0, commits=2),
    KillPoint(0.003, commits=6),
    KillPoint(0.0, commits=11),
    KillPoint(0.02, commits=4),
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pa.Table]:
    """Definitions with re-keyed views, 12k events in five files, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("crash-rekeyed")
    features = write_definitions(root / "defs", PARTITIONS)
    features.write_text(features.read_text() + REKEYED)
    events = make_events(12_000, 150, seed=31)
    for i in range(4):
        path = root / f"events{i}.parquet"
        pq.write_table(events.slice(i * 3000, 3000), path)
        result = run_command(
            "flows.ingest", "--features", str(features), "--warehouse", str(root / "wh"), str(path)
        )
        assert result.returncode == 0, result.stderr
    ref = run_command("flows.run", *run_args(features, root / "wh", root / "ref"))
    assert ref.returncode == 0, ref.stderr
    return features, root / "wh", events


def run_args(features: Path, warehouse: Path, state: Path, *extra: str) -> list[str]:
    return [
        *("--features", str(features), "--warehouse", str(warehouse), "--state", str(state)),
        *("--until-caught-up", "--batch-rows", "1000", "--views", ",".join(VIEWS), *extra),
    ]


def stored_keys(state: Path, view: str) -> set[str]:
    store = ViewStore(state, create=False)
    version = store.current_version(view)
    assert version is not None, f"{view} never went live in {state}"
    keys: set[str] = set()
    for shard in range(PARTITIONS):
        with peek(partition_dir(store.version_dir(view, version), shard)) as db:
            if db is not None:
                keys |= {decode_key(k) for k, _ in iter_entities(db)}
    return keys


def values(state: Path, layout: ViewLayout, texts: list[str], at_us: int) -> list[dict[str, Any]]:
    keys: list[Any] = texts
    if len(layout.key_columns) > 1:
        keys = [tuple(t.split(KEY_SEPARATOR)) for t in texts]
    with FeatureClient(state) as client:
        return client.get_many(layout.view, keys, at=at_us / 1e6)


def assert_same_views(features: Path, ref: Path, crashed: Path, events: pa.Table) -> None:
    defs = load_definitions(features)
    at_us = int(events.column("ts").cast(pa.int64()).to_numpy().max()) + MINUTE
    problems = []
    for view in VIEWS:
        layout = defs.layouts[view]
        expected_keys = stored_keys(ref, view)
        assert stored_keys(crashed, view) == expected_keys, view
        texts = sorted(expected_keys)
        for text, want, got in zip(
            texts,
            values(ref, layout, texts, at_us),
            values(crashed, layout, texts, at_us),
            strict=True,
        ):
            problems += [
                f"{view} {text!r} {f.name}: {got[f.name]!r}, expected {want[f.name]!r}"
                for f in layout.features
                if not same(want[f.name], got[f.name])
            ]
    assert problems == [], "\n".join(problems[:20])


@pytest.mark.parametrize("workers", [1, 2])
def test_rekeyed_views_survive_kill_9(
    deployment: tuple[Path, Path, pa.Table], tmp_path: Path, workers: int
) -> None:
    features, warehouse, events = deployment
    crashed = tmp_path / "crashed"
    args = run_args(features, warehouse, crashed, "--workers", str(workers))
    kills = crash_and_recover(args, crashed, KILLS, tmp_path / "logs")
    assert sum(k.mid_run for k in kills) >= 2, kills
    assert_same_views(features, warehouse.parent / "ref", crashed, events)


def test_rekeyed_views_survive_kill_9_of_a_two_process_cluster(
    deployment: tuple[Path, Path, pa.Table], tmp_path: Path
) -> None:
    features, warehouse, events = deployment
    crashed = tmp_path / "crashed"
    mid_run = 0
    for delay in (0.5, 0.7, 0.9):
        procs = start_cluster(run_args(features, warehouse, crashed), tmp_path / "logs")
        time.sleep(delay)
        mid_run += all(proc.poll() is None for proc in procs)
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)
    procs = start_cluster(run_args(features, warehouse, crashed), tmp_path / "logs")
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    assert mid_run >= 1  # the kills are by time: at least one must land mid-run
    assert_same_views(features, warehouse.parent / "ref", crashed, events)


def start_cluster(args: list[str], logs: Path) -> list[subprocess.Popen[bytes]]:
    logs.mkdir(parents=True, exist_ok=True)
    addresses = cluster_addresses(2)
    procs = []
    cluster = [*args, "--addresses", addresses]
    for i in range(2):
        with open(logs / f"p{i}-{time.monotonic_ns()}.txt", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "flows.run", *cluster, "--process-id", str(i)],
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs
