"""A full disk under the warehouse: ingest fails with a message naming the full path, exits
non-zero, commits nothing, and works once space is freed (counted exactly once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.adversarial.ingest_helpers import (
    fill,
    log_amounts,
    project,
    rows,
    small_tmpfs,
    unlisted_files,
)
from tests.helpers import run_command


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted at tmp_path/wh."""
    with small_tmpfs(tmp_path / "wh", "2m") as mount:
        yield mount


def test_a_full_disk_names_the_path_commits_nothing_and_recovers(
    tmp_path: Path, small_disk: Path
) -> None:
    warehouse, common = project(tmp_path)
    assert warehouse == small_disk
    n = 30_000
    pq.write_table(rows(0, n), tmp_path / "history.parquet")
    filler = fill(small_disk)
    full = run_command("flows.ingest", *common, str(tmp_path / "history.parquet"))
    assert full.returncode == 2
    assert "Traceback" not in full.stderr
    assert f"no space left on the device holding {small_disk}" in full.stderr
    assert "nothing was committed" in full.stderr
    assert log_amounts(warehouse) == []
    assert unlisted_files(warehouse) == []
    filler.unlink()
    again = run_command("flows.ingest", *common, str(tmp_path / "history.parquet"))
    assert again.returncode == 0, again.stderr
    assert log_amounts(warehouse) == [float(a) for a in range(n)]
