"""A full disk under the warehouse: ingest fails with a message naming the full path, exits
non-zero, commits nothing, and works once space is freed (counted exactly once)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.adversarial.ingest_helpers import log_amounts, project, rows, unlisted_files
from tests.helpers import run_command


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted at tmp_path/wh (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root; run as root to test ENOSPC")
    mount = tmp_path / "wh"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); ENOSPC untestable")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory`, leaving a few KB; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 16 * 1024)
    return filler


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
