"""kill -9 of `flows.ingest` at every step of its commit, then a rerun: no row lost, none
doubled, dead letters once (counted by reading the warehouse back)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.segment_writer import CRASH_AT_ENV
from tests.adversarial.ingest_helpers import (
    dead_letter_count,
    log_amounts,
    project,
    rows,
    unlisted_files,
)
from tests.helpers import run_command

N = 3_000
BAD = 7  # rows without a key: dead letters


def history(tmp_path: Path) -> Path:
    table = rows(0, N)
    keys = table.column("user_id").to_pylist()
    for i in range(BAD):
        keys[i * 100] = None
    path = tmp_path / "history.parquet"
    pq.write_table(table.set_column(0, "user_id", pa.array(keys, pa.string())), path)
    return path


@pytest.mark.parametrize("step", ["segment:1", "segment:2", "commit", "committed"])
def test_a_killed_ingest_then_a_rerun_gives_every_row_once(tmp_path: Path, step: str) -> None:
    warehouse, common = project(tmp_path)
    path = history(tmp_path)
    killed = run_command("flows.ingest", *common, str(path), env={CRASH_AT_ENV: step})
    assert killed.returncode == -9, killed.stderr
    committed = step == "committed"
    good = sorted(float(a) for a in range(N) if a % 100 or a // 100 >= BAD)
    assert log_amounts(warehouse) == (good if committed else [])
    rerun = run_command("flows.ingest", *common, str(path))
    if committed:
        assert rerun.returncode == 2
        assert "history.parquet was already ingested" in rerun.stderr
        assert "--force" in rerun.stderr
    else:
        assert rerun.returncode == 0, rerun.stderr
        assert f"{N:,} rows read, {N - BAD:,} written, {BAD} dead letters" in rerun.stdout
    assert log_amounts(warehouse) == good
    assert dead_letter_count(warehouse) == BAD
    assert unlisted_files(warehouse) == []


def test_force_ingests_the_same_content_again(tmp_path: Path) -> None:
    warehouse, common = project(tmp_path)
    pq.write_table(rows(0, 100), tmp_path / "a.parquet")
    assert run_command("flows.ingest", *common, str(tmp_path / "a.parquet")).returncode == 0
    (tmp_path / "copy.parquet").write_bytes((tmp_path / "a.parquet").read_bytes())
    again = run_command("flows.ingest", *common, str(tmp_path / "copy.parquet"))
    assert again.returncode == 2
    assert "copy.parquet was already ingested (as " in again.stderr
    assert "a.parquet) at 20" in again.stderr
    forced = run_command("flows.ingest", *common, "--force", str(tmp_path / "copy.parquet"))
    assert forced.returncode == 0, forced.stderr
    assert log_amounts(warehouse) == sorted([float(a) for a in range(100)] * 2)
