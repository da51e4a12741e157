"""The version locks and switch rules, in one process: a reader's version is never deleted,
two writers of one version as one cluster process are refused, versions only move forward."""

from __future__ import annotations

from pathlib import Path

import pytest

from state.client import FeatureClient
from state.errors import StaleVersionError, StateLockedError
from state.store import ViewStore
from tests.conftest import ProjectFactory
from tests.helpers import make_events


@pytest.fixture(scope="module")
def state(project_factory: ProjectFactory) -> Path:
    return project_factory("locks", events=make_events(500, 5, seed=41), run=True).state


def test_a_version_a_reader_has_open_is_not_deleted(state: Path) -> None:
    store = ViewStore(state)
    layout = store.layout("channels", 1)
    with FeatureClient(state) as client:
        client.get("channels", "user1")  # opens v1
        v2 = store.create_version(layout)
        store.switch("channels", v2)
        cleanup = store.drop_versions_except("channels", [v2])
        assert cleanup.busy == (1,)
        assert (store.version_dir("channels", 1) / "layout.json").is_file()
        client.get("channels", "user1")
    store.switch("channels", 1, rollback=True)
    assert store.current_version("channels") == 1
    assert store.drop_versions_except("channels", [1]).dropped == (v2,)
    assert store.versions("channels") == [1]


def test_one_writer_per_version_and_process_id(state: Path) -> None:
    store = ViewStore(state)
    first = store.claim("spend", 1, 0)
    try:
        with pytest.raises(StateLockedError, match=r"\(pid \d+: .*\) holds state dir"):
            store.claim("spend", 1, 0)
        other = store.claim("spend", 1, 1)  # another process of the same cluster
        for lease in other:
            lease.release()
        assert store.drop_versions_except("spend", []).busy == ()  # the live one is kept
    finally:
        for lease in first:
            lease.release()
    again = store.claim("spend", 1, 0)  # free again once released
    for lease in again:
        lease.release()


def test_switch_never_goes_back_unless_asked(state: Path) -> None:
    store = ViewStore(state)
    layout = store.layout("spend", 1)
    newer = store.create_version(layout)
    store.switch("spend", newer)
    with pytest.raises(StaleVersionError, match=f"not making v1 live: v{newer}"):
        store.switch("spend", 1)
    with pytest.raises(StaleVersionError):
        store.finish_catch_up("spend", 1, 0, [0])
    assert store.current_version("spend") == newer
    store.switch("spend", 1, rollback=True)
    assert store.current_version("spend") == 1
    assert store.is_complete("spend", newer)  # it was live once
    store.drop_versions_except("spend", [1])
