"""Hostile view names in the read client: path-like names ("..", "../x", "/etc"), NUL bytes and
10k-character names are unknown views, and the client opens nothing outside the state dir.

Before the fix the client joined the name into a path, so `get("../views/spend", key)` read the
view through the parent directory and `get("../../../secret/views/spend", key)` read a store that
is not the client's."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from state.client import FeatureClient
from state.errors import UnknownViewError
from tests.helpers import make_events, run_command, write_definitions

HOSTILE = [
    "",
    ".",
    "..",
    "../x",
    "./spend",
    "spend/",
    "spend/.",
    "spend\n",
    "../views/spend",
    "../../../secret/views/spend",
    "/etc",
    "/etc/passwd",
    "sp\x00end",
    "\x00",
    "x" * 10_000,
    "%2e%2e",
]

_OPENED: list[str] | None = None  # paths opened while a test records them
_THREAD = [threading.get_ident()]  # the thread whose opens are recorded


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # only the test's own thread: a client that another test leaked may still be refreshing
    if _OPENED is None or threading.get_ident() != _THREAD[0]:
        return
    watched = event in ("open", "os.listdir", "os.scandir")
    if watched and args and isinstance(args[0], str | bytes | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Every path the process opens or lists while the test runs."""
    global _OPENED
    _THREAD[0] = threading.get_ident()
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A state dir, and a copy of it beside it (`../secret`) that hostile names aim at."""
    root = tmp_path_factory.mktemp("names")
    features = write_definitions(root / "defs")
    pq.write_table(make_events(300, 5, seed=3), root / "e.parquet")
    common = ["--features", str(features), "--warehouse", str(root / "wh")]
    assert run_command("flows.ingest", *common, str(root / "e.parquet")).returncode == 0
    state = root / "app" / "state"
    result = run_command("flows.run", *common, "--state", str(state), "--until-caught-up")
    assert result.returncode == 0, result.stderr
    shutil.copytree(state, root / "secret")
    return state, root / "secret"


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:20])
def test_hostile_name_is_an_unknown_view(
    stores: tuple[Path, Path], name: str, opened: list[str]
) -> None:
    state, _ = stores
    with FeatureClient(state) as client:
        assert client.get("spend", "user1")["count"] > 0  # the real view reads
        opened.clear()
        with pytest.raises(UnknownViewError) as caught:
            client.get(name, "user1")
        with pytest.raises(UnknownViewError):
            client.get_many(name, ["user1", "user2"])
        with pytest.raises(UnknownViewError):
            client.layout(name)
        _assert_inside(opened, state)  # before close() empties its scratch dir
    message = str(caught.value)
    assert "unknown view" in message
    assert "spend" in message  # names the views that exist
    assert len(message) < 500  # a 10k-character name is not echoed whole


def test_parent_directory_names_do_not_reach_another_store(
    stores: tuple[Path, Path], opened: list[str]
) -> None:
    state, secret = stores
    with FeatureClient(secret) as direct:
        assert direct.get("spend", "user1")["count"] > 0  # the aimed-at view holds data
    opened.clear()
    with FeatureClient(state) as client:
        for name in (
            "../../../secret/views/spend",
            str(secret / "views" / "spend"),
            "../views/spend",
        ):
            with pytest.raises(UnknownViewError):
                client.get(name, "user1")
        assert client.views() == ["channels", "spend"]
        _assert_inside(opened, state)


def _assert_inside(paths: list[str], state: Path) -> None:
    allowed = (
        str(state.resolve()) + os.sep,
        os.path.join(tempfile.gettempdir(), "featureflow-client"),
    )
    outside = [
        p
        for p in paths
        if not os.path.normpath(os.path.abspath(p)).startswith(allowed)
        and "/site-packages/" not in p
        and "/lib/python" not in p
    ]
    assert not outside, f"opened outside the state dir: {outside[:5]}"
