"""Helpers of the adversarial ingest tests: a project on disk, input files whose rows carry a
unique amount (so each row can be counted in the log), and reading the whole log back."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from connectors.deadletters import read_dead_letters
from connectors.segments import Warehouse
from tests.helpers import run_command, write_definitions

PARTITIONS = 3
TS0 = 1_780_000_000_000_000  # µs, 2026-05-28


def project(tmp_path: Path) -> tuple[Path, list[str]]:
    """A definitions module; the common flags of flows.ingest for it and a warehouse."""
    features = write_definitions(tmp_path / "defs", partitions=PARTITIONS)
    return tmp_path / "wh", ["--features", str(features), "--warehouse", str(tmp_path / "wh")]


def rows(first: int, n: int) -> pa.Table:
    """n events whose amounts first..first+n-1 identify them."""
    ids = np.arange(first, first + n)
    return pa.table(
        {
            "user_id": pa.array([f"user{i % 97}" for i in ids]),
            "ts": pa.array(TS0 + ids * 1_000_000, pa.timestamp("us", tz="UTC")),
            "amount": pa.array(ids.astype(np.float64)),
            "channel": pa.array(["web"] * n),
        }
    )


def log_amounts(warehouse: Path, source: str = "txns") -> list[float]:
    """The amounts of every event in the log, sorted (a row ingested twice appears twice)."""
    wh = Warehouse(warehouse)
    got: list[float] = []
    for p in range(PARTITIONS):
        for batch in wh.read(source, p, columns=["amount"]):
            got.extend(batch.column("amount").to_pylist())
    return sorted(got, key=lambda a: (a is None, a or 0.0))


def log_table(warehouse: Path, source: str = "txns") -> pa.Table:
    wh = Warehouse(warehouse)
    batches = [b for p in range(PARTITIONS) for b in wh.read(source, p)]
    return pa.Table.from_batches(batches)


def dead_letter_count(warehouse: Path, source: str = "txns") -> int:
    return int(read_dead_letters(warehouse, source).num_rows)


def unlisted_files(warehouse: Path, source: str = "txns") -> list[Path]:
    """Segment files on disk that the manifest does not list, and temporary files."""
    wh = Warehouse(warehouse)
    listed = {wh.path(source, s) for p in range(PARTITIONS) for s in wh.segments(source, p)}
    on_disk = set((warehouse / source).glob("p*/*"))
    return sorted(on_disk - listed) + sorted((warehouse / source).glob(".*.tmp"))


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount` (a new directory); skips when it cannot be
    mounted (mounting needs root), saying why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root; run as root to test ENOSPC")
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); ENOSPC untestable")
    try:
        yield mount
    finally:
        _unmount(mount)


def _unmount(mount: Path) -> None:
    """Unmount, waiting out a moment's use by another process (e.g. a directory walk of /tmp
    by a concurrent job: "target is busy"); lazily detach if it stays busy for 5 s."""
    for _ in range(50):
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory`, leaving 16 KB; returns the filler file."""
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


__all__ = ["run_command"]
