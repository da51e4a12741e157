"""The versions of views a client has open, and which reads use them.

A `FeatureClient` reads a view's live version (the one its CURRENT file names, `state.store`)
through an `OpenView`: the version's layout and one RocksDB secondary per partition (a
read-only follower, safe while `flows.run` writes; opened with the version, or, for a partition
its writer has not created yet, once it exists), with the version's shared lease held
(`state.lock`), so `flows.replay --keep-versions` never deletes a version a client has open.
`OpenVersions` keeps, per view, the `OpenView` that new reads use:

    read --pin--> current[view] (readers += 1) --get / multi-get--> unpin (readers -= 1)
      | view not open yet, or its CURRENT not looked at for 1 s
      v
    follow: read CURRENT --another version live--> open_version (every partition) --swap-->
            current[view]; the old OpenView is retired, and closes when its last reader unpins

`follow` runs on a read only when the catch-up thread (`state.catch_up`) has not looked at the
view for a second; that thread follows every open view each round and `reopen`s a version's
secondaries when a writer reopened a partition.

Threads: any number of threads may share one client. Each read pins the `OpenView` it uses (a
reference count); a switch to a new version swaps in a fully opened new `OpenView` and closes
the old one only when its last reader is done, so a switch never fails a read. rocksdict allows
`get` and `try_catch_up_with_primary` on one handle from several threads at once; only `close`
conflicts with them ("Already borrowed"), and the reference count keeps it apart. Opening
secondaries is serialized by a lock that reads never take.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rocksdict import Rdict

from state.errors import ClientClosedError, UnknownViewError
from state.layout import ViewLayout
from state.lock import VersionLease, use_version
from state.store import (
    ViewStore,
    list_views,
    open_secondary,
    partition_dir,
    read_layout,
    scratch_dir,
)

_RECHECK_S = 1.0  # a reader looks at CURRENT itself when the catch-up thread has not for this long


class OpenView:
    """One version of a view, open for reading, and how many reads use it now.

    `version`, `layout` and `directory` never change; partitions join `dbs` as their
    writer creates them. The client closes it after it is retired and its last reader left."""

    __slots__ = (
        "absent",
        "dbs",
        "directory",
        "layout",
        "lease",
        "manifests",
        "marks",
        "readers",
        "retired",
        "seq",
        "version",
    )

    def __init__(self, version: int, layout: ViewLayout, directory: Path) -> None:
        self.version, self.layout, self.directory = version, layout, directory
        self.dbs: dict[int, Rdict] = {}
        self.manifests: dict[int, bytes] = {}  # partition -> its writer's CURRENT when opened
        self.absent: dict[int, float] = {}  # partition -> when it was last found not created
        # A secondary's data changes only when it catches up, so the partition's newest event
        # time a read found holds until the next catch-up. `seq` counts catch-ups like a
        # seqlock (odd while one runs); `marks` keeps the newest time with the `seq` it was
        # read at, and a read that sees that same even `seq` before and after its get may
        # use it instead of reading it again.
        self.seq: dict[int, int] = {}
        self.marks: dict[int, tuple[int, int | None]] = {}
        self.lease: VersionLease | None = None
        self.readers = 0
        self.retired = False

    def close(self) -> None:
        for db in self.dbs.values():
            with contextlib.suppress(Exception):
                db.close()
        self.dbs.clear()
        if self.lease is not None:
            self.lease.release()


def _no_catch_up() -> None:
    pass


class OpenVersions:
    """The `OpenView` of each view that new reads pin, and the opening of versions and
    partitions; one per client.

    `followed` runs after each look at a view's CURRENT: the client sets it to start its
    catch-up thread, which begins with the first view a read opens."""

    __slots__ = (
        "_checked",
        "_closed",
        "_opening",
        "_pins",
        "_tmp",
        "current",
        "followed",
        "root",
        "store",
    )

    def __init__(self, store: ViewStore) -> None:
        self.store, self.root = store, store.root
        self.current: dict[str, OpenView] = {}  # view -> the version new reads pin
        self.followed: Callable[[], None] = _no_catch_up
        self._checked: dict[str, float] = {}  # view -> monotonic time CURRENT was last read
        self._tmp = scratch_dir("client")
        self._pins = threading.Lock()  # reference counts and the view table; held for µs
        self._opening = threading.Lock()  # opening versions and partitions; reads never wait
        self._closed = False

    # --- pinning: which open version a read uses -------------------------------------------

    def pin(self, view: str) -> OpenView:
        """The version of `view` that reads use now, counted as read until `unpin`.

        Raises:
            UnknownViewError: no view of that name in the store.
            ClientClosedError: the client was closed.
        """
        opened = self._try_pin(view, _RECHECK_S)
        if opened is None:  # not open yet, or CURRENT not looked at for a while
            self.follow(view)
            opened = self._try_pin(view, float("inf"))
        if opened is None:
            raise UnknownViewError(f"view {view!r} in {self.root} could not be opened; retry")
        return opened

    def _try_pin(self, view: str, max_age_s: float) -> OpenView | None:
        with self._pins:
            if self._closed:
                raise ClientClosedError(
                    f"FeatureClient({str(self.root)!r}) is closed; open a new FeatureClient"
                )
            opened = self.current.get(view)
            if opened is None or time.monotonic() - self._checked[view] >= max_age_s:
                return None
            opened.readers += 1
            return opened

    def unpin(self, opened: OpenView) -> None:
        with self._pins:
            opened.readers -= 1
            done = opened.retired and opened.readers == 0
        if done:
            opened.close()

    # --- following CURRENT: which version is live ------------------------------------------

    def follow(self, view: str) -> None:
        """Read the view's CURRENT and, if another version is live, swap to it."""
        for _ in range(5):  # a switch and a cleanup can both happen between two looks
            if self._follow_once(view):
                break
            time.sleep(0.01)
        self.followed()

    def _follow_once(self, view: str) -> bool:
        with self._opening:
            # the name is looked up among the store's views, never joined into a path unchecked
            # ("..", "../x", "/etc", NUL bytes, overlong names are unknown views)
            views = list_views(self.root)
            version = self.store.current_version(view) if view in views else None
            if version is None:
                raise UnknownViewError(_unknown_view(view, self.root, views))
            opened = self.current.get(view)
            if opened is None or opened.version != version:
                fresh = self._open_version(view, version)
                if fresh is None:
                    return False
                self._swap(view, fresh)
            self._checked[view] = time.monotonic()
        return True

    def reopen(self, view: str, version: int) -> None:
        """Swap in freshly opened secondaries of the same version (readers are not disturbed:
        the old handles close when their last reader is done)."""
        with self._opening:
            current = self.current.get(view)
            if current is None or current.version != version:
                return
            fresh = self._open_version(view, version)
            if fresh is not None:
                self._swap(view, fresh)

    def _open_version(self, view: str, version: int) -> OpenView | None:
        directory = self.store.version_dir(view, version)
        lease = use_version(directory)  # held while open: a replay's cleanup skips it
        if lease is None and not (directory / "layout.json").is_file():
            return None
        opened = OpenView(version, read_layout(directory), directory)
        opened.lease = lease
        try:
            for partition in range(opened.layout.partitions):
                self.open_partition(opened, partition, locked=True)
        except BaseException:
            opened.close()
            raise
        return opened

    def _swap(self, view: str, fresh: OpenView) -> None:
        with self._pins:
            if self._closed:
                old: OpenView | None = fresh  # close() ran meanwhile: drop what we opened
            else:
                old, self.current[view] = self.current.get(view), fresh
            if old is not None:
                old.retired = True
            idle = old is not None and old.readers == 0
        if old is not None and idle:
            old.close()

    # --- opening partitions ----------------------------------------------------------------

    def open_partition(
        self, opened: OpenView, partition: int, locked: bool = False
    ) -> Rdict | None:
        """The partition's secondary, opened on first use (None while nothing is applied)."""
        if time.monotonic() - opened.absent.get(partition, -_RECHECK_S) < _RECHECK_S:
            return None
        with contextlib.nullcontext() if locked else self._opening:
            db = opened.dbs.get(partition)
            if db is None:
                db = self._open_secondary(opened, partition)
        return db

    def _open_secondary(self, opened: OpenView, partition: int) -> Rdict | None:
        primary = partition_dir(opened.directory, partition)
        if not (primary / "CURRENT").is_file():
            opened.absent[partition] = time.monotonic()
            return None
        name = f"{opened.layout.view}-v{opened.version}-p{partition}-{time.monotonic_ns()}"
        opened.manifests[partition] = writer_manifest(primary)
        db = opened.dbs[partition] = open_secondary(primary, self._tmp / name)
        opened.absent.pop(partition, None)
        return db

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Retire every open version (each closes when its last reader is done), refuse new
        pins, and remove the scratch folder. Idempotent."""
        with self._opening, self._pins:
            self._closed = True
            views, self.current = list(self.current.values()), {}
            for opened in views:
                opened.retired = True
            idle = [v for v in views if v.readers == 0]
        for opened in idle:
            opened.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def writer_manifest(primary: Path) -> bytes:
    """The name of the MANIFEST the partition's writer uses (it changes when a writer opens)."""
    try:
        return (primary / "CURRENT").read_bytes()
    except OSError:
        return b""


def _unknown_view(view: object, root: Path, views: list[str]) -> str:
    name = repr(view)
    if len(name) > 100:  # a hostile name is not echoed whole
        name = f"{name[:80]}... ({len(name)} characters)"
    known = ", ".join(views) or "(none yet)"
    return f"unknown view {name} in {root}; views: {known}; pass one of these names"
