"""The read client's contract: clear errors, empty values for unknown keys, safe while the
writer runs, and a clear stop on an on-disk format it cannot read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from state.client import FeatureClient
from state.errors import FormatVersionError, NotAViewStoreError, StateError, UnknownViewError
from state.store import ViewStore, partition_dir
from tests.helpers import make_events, run_command, write_definitions


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client")
    features = write_definitions(root / "defs")
    pq.write_table(make_events(1000, 10, seed=1), root / "e.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "e.parquet")).returncode == 0
    result = run_command("flows.run", *common, "--state", str(root / "state"), "--until-caught-up")
    assert result.returncode == 0, result.stderr
    return root / "state"


def test_unknown_key_gives_empty_window_values(state: Path) -> None:
    with FeatureClient(state) as client:
        values = client.get("spend", "nobody-has-this-key")
    assert values["count"] == 0
    assert values["count_30m"] == 0
    assert values["amount_sum_2h"] == 0.0
    assert values["amount_mean_1d"] is None
    assert values["channel_last"] is None


def test_unknown_view(state: Path) -> None:
    with FeatureClient(state) as client, pytest.raises(UnknownViewError) as caught:
        client.get("nope", "user1")
    assert "unknown view 'nope'" in str(caught.value)
    assert "spend" in str(caught.value)  # lists the views that exist


def test_not_a_view_store(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("hello")
    with pytest.raises(NotAViewStoreError, match="is not a view store"):
        FeatureClient(tmp_path)
    with pytest.raises(NotAViewStoreError):
        FeatureClient(tmp_path / "missing")


def test_store_format_mismatch(state: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    (copy / "FORMAT").write_text("featureflow-state 99\n")
    with pytest.raises(FormatVersionError, match="format 99"):
        FeatureClient(copy)


def test_value_format_mismatch(state: Path, tmp_path: Path) -> None:
    import shutil

    from rocksdict import Rdict

    from state.store import rocks_options

    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    store = ViewStore(copy)
    version = store.current_version("spend")
    assert version is not None
    found = None
    for p in range(3):
        path = partition_dir(store.version_dir("spend", version), p)
        db = Rdict(str(path), rocks_options())
        for key in db.keys():  # noqa: SIM118 - an Rdict, not a dict
            if key.startswith(b"k"):
                db[key] = b"\x63" + db[key][1:]  # a future value format
                found = key[1:].decode()
                break
        db.close()
        if found:
            break
    assert found
    with FeatureClient(copy) as client, pytest.raises(StateError, match="format 99"):
        client.get("spend", found)


def test_at_accepts_aware_datetimes_and_rejects_naive(state: Path) -> None:
    with FeatureClient(state) as client:
        aware = client.get("spend", "user1", at=datetime(2026, 6, 1, tzinfo=UTC))
        assert aware["count"] > 0
        with pytest.raises(ValueError, match="no timezone"):
            client.get("spend", "user1", at=datetime(2026, 6, 1))


def test_get_many_keeps_order(state: Path) -> None:
    keys = ["user3", "nobody", "user1", "user3"]
    with FeatureClient(state) as client:
        many = client.get_many("spend", keys, at=1_790_000_000)
        single = [client.get("spend", k, at=1_790_000_000) for k in keys]
    assert many == single
    assert many[1]["count"] == 0
