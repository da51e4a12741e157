"""Concurrent `flows.ingest` runs into one warehouse: every row lands exactly once.

The ingests are real processes, released at the same moment by a start gate (each imports the
command first, then waits for the gate file), so their manifest read-modify-writes overlap."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.adversarial.ingest_helpers import log_amounts, project, rows, unlisted_files
from tests.helpers import REPO

GATED = """
import os, sys, time
import flows.ingest
gate = sys.argv[1]
while not os.path.exists(gate):
    time.sleep(0.002)
sys.exit(flows.ingest.main(sys.argv[2:]))
"""


def start_gated(gate: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", GATED, str(gate), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_ingests_both_succeed_with_every_row_exactly_once(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    n, runs = 40_000, 3
    for i in range(runs):
        pq.write_table(rows(i * n, n), tmp_path / f"part{i}.parquet")
    gate = tmp_path / "gate"
    procs = [start_gated(gate, [*common, str(tmp_path / f"part{i}.parquet")]) for i in range(runs)]
    time.sleep(3)  # let every process import and reach the gate
    gate.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert f"{n:,} rows read, {n:,} written, 0 dead letters" in out
    assert log_amounts(warehouse) == [float(a) for a in range(runs * n)]
    assert unlisted_files(warehouse) == []


def test_two_runs_generating_the_demo_data_at_once_ingest_it_once(
    warehouse_location: str, tmp_path: Path
) -> None:
    """On an object store there is no manifest lock: the commit itself refuses a log that
    another writer filled meanwhile, so the demo history is never doubled."""
    from concurrent.futures import ThreadPoolExecutor

    from connectors.segments import Warehouse
    from flows.demo import ensure_demo_data
    from flows.settings import EXAMPLE_FEATURES
    from flows.spec.definitions import load_definitions

    source = load_definitions(EXAMPLE_FEATURES).sources["transactions"]
    warehouses = [Warehouse(warehouse_location) for _ in range(3)]
    spine = tmp_path / "spine.parquet"
    with ThreadPoolExecutor(3) as pool:
        reports = list(pool.map(lambda w: ensure_demo_data(source, w, 20_000, spine), warehouses))
    assert sum(r is not None for r in reports) == 1
    wh = warehouses[0]
    assert sum(wh.next_offset(source.name, p) for p in range(source.partitions)) == 20_000
    assert pq.read_table(spine).num_rows > 0
