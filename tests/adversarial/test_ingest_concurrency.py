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
