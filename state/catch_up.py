"""The client's catch-up thread: keeps a client's open secondaries as fresh as their writers.

A RocksDB secondary sees its writer's writes only when it catches up
(`try_catch_up_with_primary`: it replays the writer's new WAL and MANIFEST records). A
`FeatureClient` starts one thread when a read first opens a view (`state.open_versions`), and
every `refresh_s` seconds (default 50 ms) the thread does a round, so a read never waits for a
catch-up or a version switch:

    each open view:  follow CURRENT (another live version: open it, swap it in)
      each open partition:
        writer's MANIFEST is another one (it reopened)  -> reopen the version's secondaries
        otherwise                                       -> catch up (`OpenView.seq` += 2)
      each partition not open yet                       -> open it if its writer created it
      failed 5 rounds in a row                          -> reopen the version's secondaries

A catch-up of an idle partition costs ~16 us (secondaries load table handlers inline:
`state.store.rocks_options`) and holds the interpreter meanwhile; idle partitions are not
skipped (see the note at `_REOPEN_AFTER`). A failure
is counted in `ClientHealth`, logged by the `state.client` logger and retried the next round
(rounds back off up to 2 s while they fail); the thread never stops on an error, only when the
client closes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from rocksdict import Rdict

from state.errors import StateError
from state.open_versions import OpenVersions, OpenView, writer_manifest
from state.store import partition_dir

# The client's logger, by the name the README gives: deployments filter and route it by name.
log = logging.getLogger("state.client")

_MAX_BACKOFF_S = 2.0
# Every round catches every open partition up, idle or not. A catch-up costs ~16 us per idle
# partition and holds the GIL; skipping partitions whose writer's WAL and MANIFEST files had not
# changed was tried and left readers behind now and then under load (a secondary caught up
# across a flush stays behind until a later catch-up), so correctness wins over the tail.
_REOPEN_AFTER = 5  # rounds in a row a view's catch-up failed before its secondaries reopen


@dataclass(frozen=True, slots=True)
class ClientHealth:
    """The state of a client's catch-up thread.

    Attributes:
        refreshing: the catch-up thread is running.
        last_catch_up: wall-clock time (epoch seconds) of the last round in which every open
            partition caught up with its writer; None before the first.
        errors: failed catch-ups and version opens since the client started (each logged).
        last_error: the message of the latest failure, None if there was none.
        versions: the version read of each open view.
    """

    refreshing: bool
    last_catch_up: float | None
    errors: int
    last_error: str | None
    versions: dict[str, int]


class CatchUp:
    """The catch-up thread of one client's `OpenVersions`, and how it is doing."""

    __slots__ = (
        "_errors",
        "_last_catch_up",
        "_last_error",
        "_starting",
        "_stop",
        "_stuck",
        "_thread",
        "_versions",
        "refresh_s",
    )

    def __init__(self, versions: OpenVersions, refresh_s: float) -> None:
        self._versions = versions
        self.refresh_s = refresh_s
        self._stuck: dict[str, int] = {}  # view -> catch-up rounds in a row that failed
        self._starting = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = 0
        self._last_error: str | None = None
        self._last_catch_up: float | None = None

    def start(self) -> None:
        """Start the thread, unless it runs, `refresh_s` is not positive, or it was stopped."""
        with self._starting:
            if self._thread is not None or self.refresh_s <= 0 or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._loop, daemon=True, name="featureflow-client-refresh"
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for its round to end (not when called from the thread)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def health(self) -> ClientHealth:
        thread = self._thread
        return ClientHealth(
            refreshing=thread is not None and thread.is_alive(),
            last_catch_up=self._last_catch_up,
            errors=self._errors,
            last_error=self._last_error,
            versions={name: v.version for name, v in list(self._versions.current.items())},
        )

    def _loop(self) -> None:
        """Catch up every open partition and follow switches; never dies on an error."""
        failures = 0
        while not self._stop.wait(min(self.refresh_s * 2**failures, _MAX_BACKOFF_S)):
            try:
                ok = self._round()
            except Exception as exc:  # logged, counted, retried: never fatal
                ok = self._failed("catch-up round", exc)
            failures = 0 if ok else min(failures + 1, 8)

    def _round(self) -> bool:
        ok = True
        for view in list(self._versions.current):
            try:
                self._versions.follow(view)
            except Exception as exc:  # e.g. a removed view: keep the others fresh
                ok = self._failed(f"view {view!r}: following its live version", exc)
                continue
            ok = self._catch_up(view) and ok
        if ok:
            self._last_catch_up = time.time()
        return ok

    def _catch_up(self, view: str) -> bool:
        versions = self._versions
        try:
            opened = versions.pin(view)
        except StateError:
            return True  # closed meanwhile
        ok, reopened = True, False
        try:
            for partition, db in list(opened.dbs.items()):
                now = writer_manifest(partition_dir(opened.directory, partition))
                if now and now != opened.manifests.get(partition):
                    # A writer reopened the partition (a new MANIFEST): a secondary caught up
                    # across that was measured to miss its writes now and then; open anew.
                    reopened = True
                    continue
                try:
                    self._caught_up(opened, partition, db)
                except Exception as exc:  # logged; retried next round, the others go on
                    where = f"view {view!r} v{opened.version} partition {partition}: catch-up"
                    ok = self._failed(where, exc)
            for partition in range(opened.layout.partitions):
                if partition not in opened.dbs:
                    versions.open_partition(opened, partition)
        finally:
            versions.unpin(opened)
        self._stuck[view] = 0 if ok else self._stuck.get(view, 0) + 1
        if reopened or self._stuck[view] >= _REOPEN_AFTER:  # keeps failing or fell behind
            self._stuck[view] = 0
            versions.reopen(view, opened.version)
        return ok

    @staticmethod
    def _caught_up(opened: OpenView, partition: int, db: Rdict) -> None:
        """Catch a secondary up, counting it in `seq` (odd while it runs)."""
        opened.seq[partition] = opened.seq.get(partition, 0) | 1
        db.try_catch_up_with_primary()
        opened.seq[partition] += 1

    def _failed(self, what: str, exc: Exception) -> bool:
        self._errors += 1
        self._last_error = f"{what}: {exc}"
        log.warning(
            "FeatureClient(%r): %s failed (%s); retrying",
            str(self._versions.root),
            what,
            exc,
            exc_info=exc,
        )
        return False
