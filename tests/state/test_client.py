"""The read client's contract: clear errors, empty values for unknown keys, safe while the
writer runs, and a clear stop on an on-disk format it cannot read."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from state.client import FeatureClient
from state.errors import FormatVersionError, NotAViewStoreError, StateError, UnknownViewError
from state.store import ViewStore, partition_dir
from tests.conftest import ProjectFactory
from tests.helpers import make_events


@pytest.fixture(scope="module")
def state(project_factory: ProjectFactory) -> Path:
    return project_factory("client", events=make_events(1000, 10, seed=1), run=True).state


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


def test_pre_1970_times_keep_their_microseconds() -> None:
    from state.client import to_micros

    t = datetime(1969, 12, 31, 23, 59, 59, 250_000, tzinfo=UTC)
    assert to_micros(t) == -750_000
    assert to_micros(datetime(1960, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == -315_619_200_000_000 + 1
    assert to_micros(-0.75) == -750_000


def test_epoch_numbers_in_other_units_or_types_are_named() -> None:
    import numpy as np

    from state.client import to_micros

    assert to_micros(np.int64(1_790_000_000)) == to_micros(1_790_000_000) == 1_790_000_000_000_000
    assert to_micros(np.float32(0.5)) == 500_000
    for wrong in (1_790_000_000_000, 1_790_000_000_000_000, -1e12, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"not epoch seconds.*in microseconds by 1e6"):
            to_micros(wrong)
    for wrong in (True, "1790000000", np.datetime64("2026-01-01")):
        with pytest.raises(TypeError, match="aware datetime or epoch seconds"):
            to_micros(wrong)  # type: ignore[arg-type]


def test_keys_of_the_wrong_type_are_refused(state: Path) -> None:
    from state.errors import KeyTypeError

    with FeatureClient(state) as client:
        with pytest.raises(KeyTypeError, match="a list of keys, got the single key 'u1'"):
            client.get_many("spend", "u1")
        for bad in (None, b"user1", ["user1"], 1.5):
            with pytest.raises(KeyTypeError, match="keyed by 'user_id'"):
                client.get("spend", bad)  # type: ignore[arg-type]
        with pytest.raises(KeyTypeError, match="composite key"):
            client.get("spend", ("user1", "web"))  # type: ignore[arg-type]
        assert client.get("spend", 7, at=1_790_000_000) == client.get(
            "spend", "7", at=1_790_000_000
        )


def test_a_closed_client_refuses_reads(state: Path) -> None:
    from state.errors import ClientClosedError

    client = FeatureClient(state)
    client.get("spend", "user1")
    client.close()
    client.close()  # idempotent
    with pytest.raises(ClientClosedError, match="is closed; open a new FeatureClient"):
        client.get("spend", "user1")


def test_scratch_folders_of_dead_processes_are_swept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from state.store import sweep_scratch

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / f"featureflow-client-{int(dead.stdout)}-abc"
    stale_peek = tmp_path / f"featureflow-peek-{int(dead.stdout)}-def"
    mine = tmp_path / f"featureflow-client-{os.getpid()}-ghi"
    other = tmp_path / "featureflow-unrelated"
    for d in (stale, stale_peek, mine, other):
        (d / "sub").mkdir(parents=True)
    assert sorted(sweep_scratch(tmp_path)) == sorted([stale, stale_peek])
    assert mine.is_dir()
    assert other.is_dir()
