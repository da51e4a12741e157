"""flows.snapshot at its edges: spine keys read as the source's key type, a spine with only a
header, a source with no events, leftovers of a killed snapshot, and a full disk at --out."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.adversarial.ingest_helpers import fill, small_tmpfs
from tests.helpers import make_events, run_command, write_definitions

SPINE_TIME = "2026-05-30T00:00:00Z"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A warehouse holding events of the keys "00123" and "user4"; the common flags."""
    root = tmp_path_factory.mktemp("snapshot")
    features = write_definitions(root / "defs", partitions=3)
    events = make_events(2000, 20, seed=1)
    keys = ["00123" if k == "user3" else k for k in events.column("user_id").to_pylist()]
    pq.write_table(events.set_column(0, "user_id", pa.array(keys)), root / "events.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "events.parquet")).returncode == 0
    return root, common


def snapshot(common: list[str], spine: Path, out: Path, *extra: str) -> Any:
    return run_command("flows.snapshot", *common, "--spine", str(spine), "--out", str(out), *extra)


def test_a_csv_spine_key_keeps_its_text_and_type(
    ingested: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _, common = ingested
    (tmp_path / "spine.csv").write_text(f"user_id,ts,label\n00123,{SPINE_TIME},1\n")
    pq.write_table(
        pa.table({"user_id": ["00123"], "ts": pa.array([SPINE_TIME]), "label": [1]}),
        tmp_path / "spine.parquet",
    )
    for spine in ("spine.csv", "spine.parquet"):
        done = snapshot(common, tmp_path / spine, tmp_path / f"{spine}.out.parquet")
        assert done.returncode == 0, done.stderr
    from_csv = pq.read_table(tmp_path / "spine.csv.out.parquet")
    assert from_csv.schema.field("user_id").type == pa.string()
    assert from_csv.column("user_id").to_pylist() == ["00123"]
    assert from_csv.column("spend__count").to_pylist()[0] > 0
    from_parquet = pq.read_table(tmp_path / "spine.parquet.out.parquet")
    features = [c for c in from_csv.column_names if "__" in c]
    assert from_csv.select(features).equals(from_parquet.select(features))


def test_a_spine_with_only_a_header_gives_zero_rows(
    ingested: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _, common = ingested
    (tmp_path / "spine.csv").write_text("user_id,ts,label\n")
    done = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet")
    assert done.returncode == 0, done.stderr
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == 0
    assert out.schema.field("user_id").type == pa.string()
    assert "spend__count" in out.column_names


def test_a_source_without_events_is_refused_unless_allowed(tmp_path: Path) -> None:
    features = write_definitions(tmp_path / "defs", partitions=3)
    common = ["--features", str(features), "--warehouse", str(tmp_path / "empty_wh")]
    (tmp_path / "spine.csv").write_text(f"user_id,ts\nuser1,{SPINE_TIME}\n")
    refused = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet")
    assert refused.returncode == 2
    assert f"source 'txns' has no events in the warehouse {tmp_path / 'empty_wh'}" in (
        refused.stderr
    )
    assert "--allow-empty" in refused.stderr
    assert not (tmp_path / "out.parquet").exists()
    allowed = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet", "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr
    assert pq.read_table(tmp_path / "out.parquet").column("spend__count").to_pylist() == [0]


def test_temporary_files_of_killed_snapshots_are_removed(
    ingested: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _, common = ingested
    dead_pid = subprocess.Popen(["true"])  # a process that has exited: its pid is dead
    dead_pid.wait()
    stale = tmp_path / f".out.parquet.tmp-{dead_pid.pid}"
    live = tmp_path / f".out.parquet.tmp-{os.getpid()}"  # a running snapshot's: kept
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    (tmp_path / "spine.csv").write_text(f"user_id,ts\nuser4,{SPINE_TIME}\n")
    done = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet")
    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.parquet", "spine.csv", live.name]
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted at tmp_path/out."""
    with small_tmpfs(tmp_path / "out", "1m") as mount:
        yield mount


def test_a_full_disk_at_out_names_the_path_and_leaves_nothing(
    ingested: tuple[Path, list[str]], tmp_path: Path, small_disk: Path
) -> None:
    _, common = ingested
    n = 20_000
    rng = np.random.default_rng(3)  # varied rows: the output cannot shrink to a few KB
    times = 1_780_000_000_000_000 + rng.integers(0, 3 * 86_400_000_000, n)
    spine = pa.table(
        {
            "user_id": [f"user{k}" for k in rng.integers(0, 20, n)],
            "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(spine, tmp_path / "spine.parquet")
    filler = fill(small_disk)
    out = small_disk / "out.parquet"
    full = snapshot(common, tmp_path / "spine.parquet", out)
    assert full.returncode == 2
    assert "Traceback" not in full.stderr
    assert f"no space left on the device holding {small_disk} (writing {out})" in full.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    filler.unlink()
    done = snapshot(common, tmp_path / "spine.parquet", out)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).num_rows == n


def test_spine_epoch_seconds_for_a_micros_field_are_refused(
    ingested: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _, common = ingested
    seconds = 1_780_200_000
    (tmp_path / "spine.csv").write_text(f"user_id,ts\nuser4,{seconds}\n")
    refused = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet")
    assert refused.returncode == 2
    assert f"spine column 'ts' holds integer times like {seconds}" in refused.stderr
    assert "these look like s" in refused.stderr
    (tmp_path / "spine.csv").write_text(f"user_id,ts\nuser4,{seconds * 1_000_000}\n")
    done = snapshot(common, tmp_path / "spine.csv", tmp_path / "out.parquet")
    assert done.returncode == 0, done.stderr
