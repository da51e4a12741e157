"""FeatureClient: the embedded read client that serves feature values from the view store.

It runs inside the serving process, opens each view partition as a RocksDB secondary (a
read-only follower, safe while `flows.run` writes). A background thread catches the open
partitions up with the writer every `refresh_s` seconds, so a read never pays for it. A read is
one RocksDB get of the entity's tile blob plus the merge of the tiles in each window.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rocksdict import Rdict

from connectors.partitioner import partition_for
from state.codec import encode_entity, encode_key
from state.errors import UnknownViewError
from state.layout import ViewLayout
from state.read import evaluate_blob
from state.store import (
    check_store,
    list_views,
    open_secondary,
    partition_dir,
    read_current,
    read_layout,
)
from state.tiles import empty_block

Timestamp = datetime | int | float


def to_micros(t: Timestamp) -> int:
    """A timezone-aware datetime, or epoch seconds (int/float), as epoch microseconds."""
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError(
                f"timestamp {t!r} has no timezone; pass an aware datetime "
                "(e.g. datetime.now(timezone.utc))"
            )
        return int(t.timestamp()) * 1_000_000 + t.microsecond
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise TypeError(f"timestamp {t!r} must be an aware datetime or epoch seconds")
    return round(t * 1_000_000)


@dataclass
class _OpenView:
    version: int
    layout: ViewLayout
    dbs: dict[int, Rdict | None] = field(default_factory=dict)


class FeatureClient:
    """Read feature values of materialized views.

    Args:
        state_dir: the `--state` directory of `flows.run` (default `data/state`).
        refresh_s: how stale a read may be: at most this long between catch-ups with the writer.

    Raises:
        NotAViewStoreError: `state_dir` is not a view store.
        FormatVersionError: the store was written by an incompatible on-disk format.
    """

    def __init__(self, state_dir: str | Path = "data/state", *, refresh_s: float = 0.05) -> None:
        self.root = Path(state_dir)
        check_store(self.root, create=False)
        self.refresh_s = refresh_s
        self._views: dict[str, _OpenView] = {}
        self._checked: dict[str, float] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="featureflow-client-"))
        self._lock = threading.Lock()  # open/close vs the catch-up thread; reads never take it
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def views(self) -> list[str]:
        """The views with a live version."""
        return list_views(self.root)

    def layout(self, view: str) -> ViewLayout:
        return self._view(view).layout

    def get(self, view: str, key: Any, at: Timestamp | None = None) -> dict[str, Any]:
        """Feature values of one entity as of `at` (default: now).

        An unknown key gives the empty-window values (0 for count and sum, None otherwise).
        `at` must not be earlier than the view's newest applied event.

        Raises:
            UnknownViewError: no view of that name in the store.
        """
        return self.get_many(view, [key], at)[0]

    def get_many(
        self,
        view: str,
        keys: Sequence[Any],
        at: Timestamp | None = None,
    ) -> list[dict[str, Any]]:
        """Feature values of many entities, in the order of `keys`."""
        opened = self._view(view)
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        layout = opened.layout
        by_partition: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_partition.setdefault(partition_for(str(key), layout.partitions), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in keys]
        for partition, positions in by_partition.items():
            db = self._db(opened, view, partition)
            blobs = (
                db.get([encode_key(str(keys[i])) for i in positions])
                if db
                else [None] * len(positions)
            )
            assert isinstance(blobs, list)
            for i, blob in zip(positions, blobs, strict=True):
                out[i] = self._evaluate(layout, blob, t)
        return out

    @staticmethod
    def _evaluate(layout: ViewLayout, blob: bytes | None, t: int) -> dict[str, Any]:
        if blob is None:  # an unknown key: the values of empty windows
            blob = encode_entity(layout, [empty_block(g) for g in layout.groups], 0)
        return evaluate_blob(layout, blob, t)

    def _view(self, view: str) -> _OpenView:
        now = time.monotonic()
        opened = self._views.get(view)
        if opened is not None and now - self._checked.get(view, 0.0) < 1.0:
            return opened
        self._checked[view] = now
        view_dir = self.root / "views" / view
        version = read_current(view_dir)
        if version is None:
            known = ", ".join(self.views()) or "(none yet)"
            raise UnknownViewError(f"unknown view {view!r} in {self.root}; views: {known}")
        if opened is None or opened.version != version:
            fresh = _OpenView(version, read_layout(view_dir / f"v{version}"))
            with self._lock:
                if opened is not None:
                    self._close_view(opened)
                self._views[view] = opened = fresh
        return opened

    def _db(self, opened: _OpenView, view: str, partition: int) -> Rdict | None:
        db = opened.dbs.get(partition)
        if db is None:
            primary = partition_dir(self.root / "views" / view / f"v{opened.version}", partition)
            if not (primary / "CURRENT").is_file():
                return None  # nothing applied to this partition yet
            secondary = self._tmp / f"{view}-v{opened.version}-p{partition}"
            with self._lock:
                db = opened.dbs[partition] = open_secondary(primary, secondary)
            self._start_refresher()
        return db

    def _start_refresher(self) -> None:
        if self._refresher is None and self.refresh_s > 0:
            self._refresher = threading.Thread(
                target=self._refresh_loop, daemon=True, name="featureflow-client-refresh"
            )
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                for opened in self._views.values():
                    for db in opened.dbs.values():
                        if db is not None:
                            db.try_catch_up_with_primary()

    @staticmethod
    def _close_view(opened: _OpenView) -> None:
        for db in opened.dbs.values():
            if db is not None:
                db.close()

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        with self._lock:
            for opened in self._views.values():
                self._close_view(opened)
            self._views.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
