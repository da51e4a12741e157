"""Issue 8 item 9: a full disk under --state. flows.run stops with a message naming the full
path (no traceback, no Rust panic), commits nothing half-way, and once space is freed a rerun
resumes and gives the views of a run that never hit the full disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.segments import Warehouse
from flows.ingest import ingest_table
from flows.spec import load_definitions
from state.store import ViewStore
from tests.adversarial.ingest_helpers import fill, small_tmpfs
from tests.e2e.test_crash import compare_states
from tests.helpers import make_events, run_command, write_definitions


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A 6 MB tmpfs mounted at tmp_path/state, already a view store."""
    with small_tmpfs(tmp_path / "state", "6m") as mount:
        ViewStore(mount)
        yield mount


@pytest.mark.parametrize("keys", [3000, 15_000])  # 15k: a replay batch committed as a file
def test_a_full_state_disk_names_the_path_and_recovers(
    tmp_path: Path, small_state: Path, keys: int
) -> None:
    features = write_definitions(tmp_path / "defs", partitions=3)
    events = make_events(60_000, keys, seed=4)
    ingest_table(load_definitions(features).sources["txns"], events, Warehouse(tmp_path / "wh"))
    common = ["--features", str(features), "--warehouse", str(tmp_path / "wh")]
    common += ["--until-caught-up"]
    filler = fill(small_state)

    full = run_command("flows.run", *common, "--state", str(small_state))
    assert full.returncode == 2, full.stdout + full.stderr
    assert f"no space left on the device holding {small_state}" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr
    assert "panicked" not in full.stderr

    filler.unlink()
    again = run_command("flows.run", *common, "--state", str(small_state))
    assert again.returncode == 0, again.stdout + again.stderr
    ref = run_command("flows.run", *common, "--state", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    compare_states(features, tmp_path / "ref", small_state, events)
