"""What a state directory runs: live view versions and layouts, builds in progress, and the
definitions module `flows.run` recorded (state/definitions.py).

Read-only: nothing here opens RocksDB for writing or changes a file. The recorded module is
imported like any definitions module; when that fails (it imports a helper module that was not
recorded, say) the layouts alone still describe the views, and `note` says what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from flows.errors import FlowError
from flows.spec import Definitions, load_definitions
from state.definitions import recorded_module
from state.errors import StateError
from state.layout import ViewLayout
from state.store import ViewStore, read_layout


@dataclass(frozen=True, slots=True)
class LiveView:
    """One view as the store holds it: the live version, its layout, other versions."""

    name: str
    version: int
    layout: ViewLayout
    versions: tuple[int, ...]
    bytes_on_disk: int


@dataclass(frozen=True, slots=True)
class Deployed:
    """Everything the plan compares a definitions module with."""

    state: Path
    views: dict[str, LiveView]
    builds: dict[str, dict[str, int]]  # view -> layout key -> version being built beside
    definitions: Definitions | None
    record: str | None  # the recorded definitions' SHA-256
    notes: tuple[str, ...] = field(default=())


def read_deployed(state: Path) -> Deployed:
    """Read the state directory (an absent or empty one deploys nothing)."""
    notes: list[str] = []
    if not (state / "FORMAT").is_file():
        notes.append(f"{state} holds no view store yet: everything is new")
        return Deployed(state, {}, {}, None, None, tuple(notes))
    store = ViewStore(state, create=False)
    views: dict[str, LiveView] = {}
    builds: dict[str, dict[str, int]] = {}
    for name in store.views():
        live = _live_view(store, name)
        if live is not None:
            views[name] = live
            builds[name] = _builds(store, name, live.version)
    definitions, record = _recorded(state, notes)
    return Deployed(state, views, builds, definitions, record, tuple(notes))


def _live_view(store: ViewStore, name: str) -> LiveView | None:
    version = store.current_version(name)
    if version is None:
        return None
    vdir = store.version_dir(name, version)
    return LiveView(
        name, version, read_layout(vdir), tuple(store.versions(name)), directory_bytes(vdir)
    )


def _builds(store: ViewStore, name: str, live: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for v in store.versions(name):
        vdir = store.version_dir(name, v)
        if v > live and (vdir / "layout.json").is_file():
            found[layout_key(read_layout(vdir))] = v
    return found


def _recorded(state: Path, notes: list[str]) -> tuple[Definitions | None, str | None]:
    try:
        found = recorded_module(state)
    except StateError as exc:
        notes.append(f"the recorded definitions cannot be read: {exc}")
        return None, None
    if found is None:
        notes.append(
            "no definitions recorded in the state directory (flows.run records them): "
            "sources and services are compared by view layouts only"
        )
        return None, None
    sha, module = found
    try:
        return load_definitions(module), sha
    except FlowError as exc:
        notes.append(
            f"the recorded definitions {module} do not load ({exc}); sources and services "
            "are compared by view layouts only"
        )
        return None, sha


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when it is missing)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def layout_key(layout: ViewLayout) -> str:
    """A canonical text of a layout: equal exactly when the layouts have the same semantics."""
    return orjson.dumps(layout.to_json(), option=orjson.OPT_SORT_KEYS).decode()
