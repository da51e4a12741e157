"""FeatureClient: the embedded read client that serves feature values from the view store.

It runs inside the serving process and opens each view partition as a RocksDB secondary (a
read-only follower, safe while `flows.run` writes). A background thread catches the open
partitions up with the writer every `refresh_s` seconds and follows version switches, so a
read never pays for either. `get` is one RocksDB get of the entity's tile blob plus the merge
of the tiles in each window (`state.read`); `get_many` one multi-get per partition and one
merge of every entity's windows together (`state.batch_read`), equal to `get` key by key. A
read as of a given time takes the partition's newest event times in the same (multi-)get.

Threads: any number of threads may share one client. Each read pins the `_OpenView` it uses (a
reference count); a switch to a new version swaps in a fully opened new `_OpenView` and closes
the old one only when its last reader is done, so a switch never fails a read. rocksdict allows
`get` and `try_catch_up_with_primary` on one handle from several threads at once; only `close`
conflicts with them ("Already borrowed"), and the reference count keeps it apart. Opening
secondaries is serialized by a lock that reads never take.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from rocksdict import Rdict

from connectors.partitioner import partition_for
from state.batch_read import Checks, empty_blob, evaluate_blobs
from state.codec import (
    ENTITY_PREFIX,
    FOREIGN_WATERMARK,
    WATERMARK,
    decode_int,
    encode_key,
    foreign_key,
    key_text,
)
from state.definitions import load_service_plans, recorded_module
from state.errors import (
    ClientClosedError,
    KeyTypeError,
    MissingFeatureError,
    RequestTypeError,
    StateError,
    UnknownServiceError,
    UnknownViewError,
)
from state.layout import FeatureDef, ViewLayout
from state.lock import VersionLease, use_version
from state.read import AsOf, evaluate_blob
from state.servedlog import ServedLog, logs_service_reads, logs_view_reads
from state.services import (
    ServicePlan,
    ViewRead,
    check_entity_columns,
    evaluate_service,
    feature_column,
    request_columns,
    rows_of,
)
from state.store import (
    ViewStore,
    list_views,
    open_secondary,
    partition_dir,
    read_layout,
    scratch_dir,
)
from state.timestamps import Timestamp, to_micros

log = logging.getLogger(__name__)

_RECHECK_S = 1.0  # a reader looks at CURRENT itself when the catch-up thread has not for this long
_MAX_BACKOFF_S = 2.0
_SINGLE_READS = (
    2  # up to this many keys, get_many reads key by key (the batch's fixed cost is more)
)
# A catch-up costs ~0.5-1 ms per partition even when nothing changed, and holds the GIL (a read
# waits for it): a partition whose WAL and MANIFEST files did not change since the last one is
# skipped, and caught up anyway this often (in case a file system reports sizes lazily).
_FORCE_CATCH_UP_S = 10.0
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


class _OpenView:
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
        "written",
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
        # partition -> (its writer's files as of the last catch-up, when it was forced)
        self.written: dict[int, tuple[tuple[tuple[str, int, int], ...], float]] = {}
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


class FeatureClient:
    """Read feature values of materialized views; safe to share between threads.

    Args:
        state_dir: the `--state` directory of `flows.run` (default `data/state`).
        refresh_s: how stale a read may be: at most this long between catch-ups with the writer.
        features: the definitions module whose feature services `get_service` serves; default
            the definitions `flows.run` recorded in `state_dir` (followed when it records
            new ones).
        served_log: log what this client serves (`state.servedlog.ServedLog`: Parquet in the
            warehouse, off the read's path, sampled); the client closes it on `close`.

    Raises:
        NotAViewStoreError: `state_dir` is not a view store.
        FormatVersionError: the store was written by an incompatible on-disk format.
    """

    def __init__(
        self,
        state_dir: str | Path = "data/state",
        *,
        refresh_s: float = 0.05,
        features: str | Path | None = None,
        served_log: ServedLog | None = None,
    ) -> None:
        self.root = Path(state_dir)
        self._store = ViewStore(self.root, create=False)  # checks it is a view store
        self.refresh_s = refresh_s
        self._services = _ServiceBook(self.root, Path(features) if features else None)
        self.served_log = served_log
        self._views: dict[str, _OpenView] = {}
        self._checked: dict[str, float] = {}  # view -> monotonic time CURRENT was last read
        self._stuck: dict[str, int] = {}  # view -> catch-up rounds in a row that failed
        self._tmp = scratch_dir("client")
        self._pins = threading.Lock()  # reference counts and the view table; held for µs
        self._opening = threading.Lock()  # opening versions and partitions; reads never wait
        self._stop = threading.Event()
        self._closed = False
        self._refresher: threading.Thread | None = None
        self._errors = 0
        self._last_error: str | None = None
        self._last_catch_up: float | None = None

    def views(self) -> list[str]:
        """The views with a live version."""
        return list_views(self.root)

    def layout(self, view: str) -> ViewLayout:
        opened = self._pin(view)
        try:
            return opened.layout
        finally:
            self._unpin(opened)

    def health(self) -> ClientHealth:
        """How the catch-up thread is doing (last successful round, failures)."""
        refresher = self._refresher
        return ClientHealth(
            refreshing=refresher is not None and refresher.is_alive(),
            last_catch_up=self._last_catch_up,
            errors=self._errors,
            last_error=self._last_error,
            versions={name: v.version for name, v in list(self._views.items())},
        )

    @logs_view_reads
    def get(self, view: str, key: str | int, at: Timestamp | None = None) -> dict[str, Any]:
        """Feature values of one entity as of `at` (default: now).

        An unknown key gives the empty-window values (0 for count and sum, None otherwise).
        A key is a str (an int is read as its decimal text).

        Raises:
            UnknownViewError: no view of that name in the store.
            KeyTypeError: the key is not a str or int.
            InexactReadError: the stored tiles cannot answer exactly as of `at` (see README).
            ClientClosedError: the client was closed.
        """
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        opened = self._pin(view)
        try:
            layout = opened.layout
            text = _key_text(view, layout, key)
            blob, newest = self._one_blob(opened, text, at is not None)
            return _evaluate(layout, blob, t, AsOf(text, newest) if at is not None else None)
        finally:
            self._unpin(opened)

    @logs_view_reads
    def get_many(
        self,
        view: str,
        keys: Sequence[str | int],
        at: Timestamp | None = None,
    ) -> list[dict[str, Any]]:
        """Feature values of many entities, in the order of `keys` (a list, not one string).

        One RocksDB multi-get per partition; the features of all the entities are merged
        together (`state.batch_read`), equal to `get` key by key."""
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        opened = self._pin(view)
        try:
            texts = _key_texts(view, opened.layout, keys)
            if len(texts) <= _SINGLE_READS:
                blobs, marks = self._blobs(opened, texts, at is not None)
                layout, strict = opened.layout, at is not None
                return [
                    _evaluate(layout, b, t, AsOf(k, m) if strict else None)
                    for k, b, m in zip(texts, blobs, marks, strict=True)
                ]
            columns = self._read_columns(opened, texts, t, at is not None, None)
        finally:
            self._unpin(opened)
        names = list(columns)
        return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]

    def _columns(
        self, view: str, keys: Sequence[Any], at: Timestamp | None, only: frozenset[str]
    ) -> tuple[int, ViewLayout, dict[str, list[Any]]]:
        """The features `only` of `keys` as {feature: values} columns (`get_many`'s read),
        with the version and layout read."""
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        opened = self._pin(view)
        try:
            texts = _key_texts(view, opened.layout, keys)
            columns = self._read_columns(opened, texts, t, at is not None, only)
        finally:
            self._unpin(opened)
        return opened.version, opened.layout, columns

    def _read_columns(
        self, opened: _OpenView, texts: list[str], t: int, strict: bool, only: frozenset[str] | None
    ) -> dict[str, list[Any]]:
        """{feature: values} of the keys `texts`; each distinct key is read and merged once."""
        layout = opened.layout
        if len(texts) == 1:  # one request: `get`'s read
            blob, newest = self._one_blob(opened, texts[0], strict)
            row = _evaluate(layout, blob, t, AsOf(texts[0], newest) if strict else None, only)
            return {name: [value] for name, value in row.items()}
        distinct = list(dict.fromkeys(texts))
        blobs, marks = self._blobs(opened, distinct, strict)
        if len(distinct) > _SINGLE_READS:
            checks = Checks(distinct, marks) if strict else None
            columns = evaluate_blobs(layout, blobs, t, checks, only)
        else:
            rows = [
                _evaluate(layout, b, t, AsOf(k, m) if strict else None, only)
                for k, b, m in zip(distinct, blobs, marks, strict=True)
            ]
            names = [f.name for f in layout.features if only is None or f.name in only]
            columns = {name: [r[name] for r in rows] for name in names}
        if len(distinct) == len(texts):
            return columns
        where = {k: i for i, k in enumerate(distinct)}
        return {
            name: _spread(values, [where[k] for k in texts]) for name, values in columns.items()
        }

    def _one_blob(
        self, opened: _OpenView, text: str, strict: bool
    ) -> tuple[bytes | None, int | None]:
        """One key's blob (a point get) and, when `strict`, its partition's newest event time
        (see `_blobs`; noted per catch-up round, so most strict reads are one point get too)."""
        partition = partition_for(text, opened.layout.partitions)
        db = opened.dbs.get(partition) or self._open_partition(opened, partition)
        if db is None:
            return None, None
        if not strict:
            return db.get(encode_key(text)), None
        seq = opened.seq.get(partition, 0)
        noted = opened.marks.get(partition)
        if noted is not None and noted[0] == seq:  # found since the last catch-up
            blob = db.get(encode_key(text))
            if opened.seq.get(partition, 0) == seq:  # and no catch-up ran around the get
                return blob, noted[1]
            seq = opened.seq.get(partition, 0)
        found = db.get([encode_key(text), *_watermark_keys(opened.layout.partitions, partition)])
        assert isinstance(found, list)
        newest = _newest(found[1:])
        if not seq & 1 and opened.seq.get(partition, 0) == seq:
            opened.marks[partition] = (seq, newest)
        return found[0], newest

    def _blobs(
        self, opened: _OpenView, keys: list[str], strict: bool
    ) -> tuple[list[bytes | None], list[int | None]]:
        """Each key's blob (one multi-get per partition) and, when `strict`, its partition's
        newest event time, read in the same multi-get (one consistent view of the partition,
        so never older than what pruned the blobs)."""
        parts = opened.layout.partitions
        by_partition: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_partition.setdefault(partition_for(key, parts), []).append(i)
        blobs: list[bytes | None] = [None] * len(keys)
        marks: list[int | None] = [None] * len(keys)
        for partition, positions in by_partition.items():
            db = opened.dbs.get(partition) or self._open_partition(opened, partition)
            if db is None:
                continue
            extra = _watermark_keys(parts, partition) if strict else []
            if len(positions) == 1 and not strict:  # a point get costs less than a multi-get
                blobs[positions[0]] = db.get(ENTITY_PREFIX + keys[positions[0]].encode())
                continue
            wanted: list[str | int | float | bytes | bool] = [
                ENTITY_PREFIX + keys[i].encode() for i in positions
            ]
            found = db.get(wanted + extra)
            assert isinstance(found, list)
            for i, blob in zip(positions, found, strict=False):
                blobs[i] = blob
            if strict:
                newest = _newest(found[len(positions) :])
                for i in positions:
                    marks[i] = newest
        return blobs, marks

    # --- feature services: one model's vector per row ---------------------------------------

    def get_service(
        self, name: str, row: Mapping[str, Any], at: Timestamp | None = None
    ) -> dict[str, Any]:
        """A feature service's vector for one request as of `at` (default: now).

        `row` holds the entity columns (named as each view's key columns, or as the service's
        `keys=` maps them) and the request fields. The result is {column: value} with columns
        `<view>__<feature>` and `<on_demand>__<output>` in the service's order.

        Raises:
            UnknownServiceError: no service of that name in the definitions.
            ServiceRequestError: an entity column or request field is missing.
            RequestTypeError: a value of the wrong type.
            MissingFeatureError: a feature is not in the live version of its view.
            OnDemandError: an on-demand function raised or returned a wrong output.
        """
        if not isinstance(row, Mapping):
            raise RequestTypeError(
                f"service {name!r}: get_service takes one row as a dict, got a "
                f"{type(row).__name__}; for many rows use get_service_many"
            )
        return self.get_service_many(name, [row], at)[0]

    @logs_service_reads
    def get_service_many(
        self,
        name: str,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        at: Timestamp | None = None,
    ) -> list[dict[str, Any]]:
        """`get_service` for many rows (a list of dicts or a `pyarrow.Table`), in their order:
        one `get_many` per view, then the on-demand functions once over all the rows."""
        plan = self._services.plan(name)
        if not isinstance(rows, pa.Table) and (
            isinstance(rows, Mapping | str | bytes) or not isinstance(rows, Sequence)
        ):
            raise RequestTypeError(
                f"service {name!r}: get_service_many takes a list of dicts or a "
                f"pyarrow.Table, got a {type(rows).__name__}; for one row use get_service"
            )
        n = rows.num_rows if isinstance(rows, pa.Table) else len(rows)
        check_entity_columns(plan, rows)
        request = request_columns(plan, rows)
        features: dict[str, pa.Array] = {}
        for read in plan.reads:
            features.update(self._service_view(plan, read, rows, at))
        return rows_of(evaluate_service(plan, features, request, n), n)

    def _service_view(
        self,
        plan: ServicePlan,
        read: ViewRead,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        at: Timestamp | None,
    ) -> dict[str, pa.Array]:
        keys = _entity_keys(plan, read, rows)
        present = [i for i, k in enumerate(keys) if k is not None]
        try:
            wanted = [keys[i] for i in present]
            version, layout, found = self._columns(read.view, wanted, at, frozenset(read.features))
        except KeyTypeError as exc:
            raise RequestTypeError(
                f"service {plan.name!r}: entity column(s) {list(read.entity_columns)} of view "
                f"{read.view!r}: {exc}"
            ) from exc
        by_name = _features_by_name(layout)
        missing = [f for f in read.features if f not in by_name]
        if missing:  # the live version does not have them: the definitions changed under it
            raise _missing_feature(plan, read, missing, version, layout)
        if len(present) < len(keys):  # rows without a key read as unknown keys do
            empty = _empty_values(layout)
            for f in read.features:
                values = [empty[f]] * len(keys)
                for i, v in zip(present, found[f], strict=True):
                    values[i] = v
                found[f] = values
        return {read.column(f): feature_column(layout, by_name[f], found[f]) for f in read.features}

    # --- pinning: which open version a read uses -------------------------------------------

    def _pin(self, view: str) -> _OpenView:
        opened = self._try_pin(view, _RECHECK_S)
        if opened is None:  # not open yet, or CURRENT not looked at for a while
            self._follow(view)
            opened = self._try_pin(view, float("inf"))
        if opened is None:
            raise UnknownViewError(f"view {view!r} in {self.root} could not be opened; retry")
        return opened

    def _try_pin(self, view: str, max_age_s: float) -> _OpenView | None:
        with self._pins:
            if self._closed:
                raise ClientClosedError(
                    f"FeatureClient({str(self.root)!r}) is closed; open a new FeatureClient"
                )
            opened = self._views.get(view)
            if opened is None or time.monotonic() - self._checked[view] >= max_age_s:
                return None
            opened.readers += 1
            return opened

    def _unpin(self, opened: _OpenView) -> None:
        with self._pins:
            opened.readers -= 1
            done = opened.retired and opened.readers == 0
        if done:
            opened.close()

    def _follow(self, view: str) -> None:
        """Read the view's CURRENT and, if another version is live, swap to it."""
        for _ in range(5):  # a switch and a cleanup can both happen between two looks
            if self._follow_once(view):
                break
            time.sleep(0.01)
        self._start_refresher()

    def _follow_once(self, view: str) -> bool:
        with self._opening:
            # the name is looked up among the store's views, never joined into a path unchecked
            # ("..", "../x", "/etc", NUL bytes, overlong names are unknown views)
            views = self.views()
            version = self._store.current_version(view) if view in views else None
            if version is None:
                raise UnknownViewError(_unknown_view(view, self.root, views))
            opened = self._views.get(view)
            if opened is None or opened.version != version:
                fresh = self._open_version(view, version)
                if fresh is None:
                    return False
                self._swap(view, fresh)
            self._checked[view] = time.monotonic()
        return True

    def _open_version(self, view: str, version: int) -> _OpenView | None:
        directory = self._store.version_dir(view, version)
        lease = use_version(directory)  # held while open: a replay's cleanup skips it
        if lease is None and not (directory / "layout.json").is_file():
            return None
        opened = _OpenView(version, read_layout(directory), directory)
        opened.lease = lease
        try:
            for partition in range(opened.layout.partitions):
                self._open_partition(opened, partition, locked=True)
        except BaseException:
            opened.close()
            raise
        return opened

    def _swap(self, view: str, fresh: _OpenView) -> None:
        with self._pins:
            if self._closed:
                old: _OpenView | None = fresh  # close() ran meanwhile: drop what we opened
            else:
                old, self._views[view] = self._views.get(view), fresh
            if old is not None:
                old.retired = True
            idle = old is not None and old.readers == 0
        if old is not None and idle:
            old.close()

    def _open_partition(
        self, opened: _OpenView, partition: int, locked: bool = False
    ) -> Rdict | None:
        """The partition's secondary, opened on first use (None while nothing is applied)."""
        if time.monotonic() - opened.absent.get(partition, -_RECHECK_S) < _RECHECK_S:
            return None
        with contextlib.nullcontext() if locked else self._opening:
            db = opened.dbs.get(partition)
            if db is None:
                db = self._open_secondary(opened, partition)
        return db

    def _open_secondary(self, opened: _OpenView, partition: int) -> Rdict | None:
        primary = partition_dir(opened.directory, partition)
        if not (primary / "CURRENT").is_file():
            opened.absent[partition] = time.monotonic()
            return None
        name = f"{opened.layout.view}-v{opened.version}-p{partition}-{time.monotonic_ns()}"
        opened.manifests[partition] = _manifest(primary)
        db = opened.dbs[partition] = open_secondary(primary, self._tmp / name)
        opened.absent.pop(partition, None)
        return db

    # --- the catch-up thread ---------------------------------------------------------------

    def _start_refresher(self) -> None:
        with self._pins:
            if self._refresher is not None or self.refresh_s <= 0 or self._closed:
                return
            self._refresher = threading.Thread(
                target=self._refresh_loop, daemon=True, name="featureflow-client-refresh"
            )
            self._refresher.start()

    def _refresh_loop(self) -> None:
        """Catch up every open partition and follow switches; never dies on an error."""
        failures = 0
        while not self._stop.wait(min(self.refresh_s * 2**failures, _MAX_BACKOFF_S)):
            try:
                ok = self._refresh_once()
            except Exception as exc:  # logged, counted, retried: never fatal
                ok = self._failed("catch-up round", exc)
            failures = 0 if ok else min(failures + 1, 8)

    def _refresh_once(self) -> bool:
        ok = True
        for view in list(self._views):
            try:
                self._follow(view)
            except Exception as exc:  # e.g. a removed view: keep the others fresh
                ok = self._failed(f"view {view!r}: following its live version", exc)
                continue
            ok = self._catch_up(view) and ok
        if ok:
            self._last_catch_up = time.time()
        return ok

    def _catch_up(self, view: str) -> bool:
        try:
            opened = self._pin(view)
        except StateError:
            return True  # closed meanwhile
        ok, reopened = True, False
        try:
            for partition, db in list(opened.dbs.items()):
                now = _manifest(partition_dir(opened.directory, partition))
                if now and now != opened.manifests.get(partition):
                    # A writer reopened the partition (a new MANIFEST): a secondary caught up
                    # across that was measured to miss its writes now and then; open anew.
                    reopened = True
                    continue
                try:
                    self._caught_up_if_written(opened, partition, db)
                except Exception as exc:  # logged; retried next round, the others go on
                    where = f"view {view!r} v{opened.version} partition {partition}: catch-up"
                    ok = self._failed(where, exc)
            for partition in range(opened.layout.partitions):
                if partition not in opened.dbs:
                    self._open_partition(opened, partition)
        finally:
            self._unpin(opened)
        self._stuck[view] = 0 if ok else self._stuck.get(view, 0) + 1
        if reopened or self._stuck[view] >= _REOPEN_AFTER:  # keeps failing or fell behind
            self._stuck[view] = 0
            self._reopen(view, opened.version)
        return ok

    @classmethod
    def _caught_up_if_written(cls, opened: _OpenView, partition: int, db: Rdict) -> None:
        """Catch a secondary up if its writer wrote since the last time (or a while ago)."""
        files = _written(partition_dir(opened.directory, partition))
        last = opened.written.get(partition)
        now = time.monotonic()
        if files and last is not None and last[0] == files and now - last[1] < _FORCE_CATCH_UP_S:
            return
        cls._caught_up(opened, partition, db)  # files looked at before: a write meanwhile
        opened.written[partition] = (files, now)

    @staticmethod
    def _caught_up(opened: _OpenView, partition: int, db: Rdict) -> None:
        """Catch a secondary up, counting it in `seq` (odd while it runs)."""
        opened.seq[partition] = opened.seq.get(partition, 0) | 1
        db.try_catch_up_with_primary()
        opened.seq[partition] += 1

    def _reopen(self, view: str, version: int) -> None:
        """Swap in freshly opened secondaries of the same version (readers are not disturbed:
        the old handles close when their last reader is done)."""
        with self._opening:
            current = self._views.get(view)
            if current is None or current.version != version:
                return
            fresh = self._open_version(view, version)
            if fresh is not None:
                self._swap(view, fresh)

    def _failed(self, what: str, exc: Exception) -> bool:
        self._errors += 1
        self._last_error = f"{what}: {exc}"
        log.warning(
            "FeatureClient(%r): %s failed (%s); retrying", str(self.root), what, exc, exc_info=exc
        )
        return False

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every open view; later calls raise ClientClosedError. Idempotent."""
        self._stop.set()
        refresher = self._refresher
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join()
        with self._opening, self._pins:
            self._closed = True
            views, self._views = list(self._views.values()), {}
            for opened in views:
                opened.retired = True
            idle = [v for v in views if v.readers == 0]
        for opened in idle:
            opened.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self.served_log is not None:
            self.served_log.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _unknown_view(view: object, root: Path, views: list[str]) -> str:
    name = repr(view)
    if len(name) > 100:  # a hostile name is not echoed whole
        name = f"{name[:80]}... ({len(name)} characters)"
    known = ", ".join(views) or "(none yet)"
    return f"unknown view {name} in {root}; views: {known}; pass one of these names"


def _spread(values: list[Any], index: list[int]) -> list[Any]:
    """`values` at `index` (a key asked for several times gets a value per time; lists, the
    vector and last_k values, are copied so that no two results share one)."""
    out = [values[i] for i in index]
    if any(type(v) is list for v in values):
        seen: set[int] = set()
        for j, i in enumerate(index):
            if i in seen and type(out[j]) is list:
                out[j] = list(out[j])
            seen.add(i)
    return out


def _watermark_keys(partitions: int, shard: int) -> list[str | int | float | bytes | bool]:
    """The metadata keys of a shard's newest event times: its own partition's, then each other
    source partition's (a shard learns positions only of the source's partitions: the flow
    refuses a topic whose partition count is not the source's)."""
    found = _MARKS.get((partitions, shard))
    if found is None:
        others = [foreign_key(FOREIGN_WATERMARK, p) for p in range(partitions) if p != shard]
        found = _MARKS[(partitions, shard)] = [WATERMARK, *others]
    return found


_MARKS: dict[tuple[int, int], list[str | int | float | bytes | bool]] = {}


def _newest(raw: Sequence[bytes | None]) -> int | None:
    """The newest of the event times read with `_watermark_keys` (None if none is recorded)."""
    marks = [decode_int(m) for m in raw if m is not None]
    return max(marks) if marks else None


def _written(primary: Path) -> tuple[tuple[str, int, int], ...]:
    """What a secondary's catch-up reads, as file (name, size, mtime): the writer's WAL files
    (appended on every write) and MANIFEST files (appended on every flush or compaction, a new
    one when it reopens). Unchanged, a catch-up would find nothing new."""
    try:
        with os.scandir(primary) as entries:
            found = [
                (e.name, st.st_size, st.st_mtime_ns)
                for e in entries
                if e.name.endswith(".log") or e.name.startswith("MANIFEST-")
                for st in (e.stat(),)
            ]
    except OSError:
        return ()  # gone or unreadable: no skipping, let the catch-up find out
    return tuple(sorted(found))


def _manifest(primary: Path) -> bytes:
    """The name of the MANIFEST the partition's writer uses (it changes when a writer opens)."""
    try:
        return (primary / "CURRENT").read_bytes()
    except OSError:
        return b""


def _key_texts(view: str, layout: ViewLayout, keys: Sequence[str | int]) -> list[str]:
    if isinstance(keys, str | bytes):
        raise KeyTypeError(
            f"view {view!r}: get_many takes a list of keys, got the single key {keys!r}; "
            f"use get({view!r}, key) or get_many({view!r}, [key])"
        )
    if len(layout.key_columns) == 1:  # a str key is its own text
        return [k if type(k) is str else _key_text(view, layout, k) for k in keys]
    return [_key_text(view, layout, key) for key in keys]


def _key_text(view: str, layout: ViewLayout, key: object) -> str:
    parts = layout.key_columns
    if len(parts) > 1:
        if not isinstance(key, tuple | list) or len(key) != len(parts):
            raise KeyTypeError(
                f"view {view!r}: key {key!r} is not a composite key; the view is keyed by "
                f"{parts}: pass a tuple of {len(parts)} values, e.g. "
                f"{tuple(f'<{p}>' for p in parts)}"
            )
        return key_text([_part(view, parts, p) for p in key])
    if isinstance(key, tuple) and len(key) == 1:
        key = key[0]
    return key_text([_part(view, parts, key)])


def _part(view: str, parts: tuple[str, ...], value: object) -> str | int | bool:
    if isinstance(value, str | int):  # an int is its decimal text, a bool "true"/"false"
        return value
    what = "a tuple (a composite key)" if isinstance(value, tuple | list) else type(value).__name__
    raise KeyTypeError(
        f"view {view!r}: key {value!r} is {what}; the view is keyed by "
        f"{parts[0] if len(parts) == 1 else parts!r}, whose values are str (or int for an "
        "integer column): pass the key as a str"
    )


class _ServiceBook:
    """The feature services a client serves: from `features=`, or from the definitions record
    (re-read when the deployment records new definitions, looked at once a second)."""

    __slots__ = ("_checked", "_lock", "_plans", "_record", "features", "root")

    def __init__(self, root: Path, features: Path | None) -> None:
        self.root, self.features = root, features
        self._plans: dict[str, ServicePlan] | None = None
        self._record: str | None = None
        self._checked = -_RECHECK_S
        self._lock = threading.Lock()

    def plan(self, name: str) -> ServicePlan:
        plans = self._current()
        plan = plans.get(name)
        if plan is None:
            where = (
                f"definitions module {str(self.features)!r}"
                if self.features
                else f"the definitions recorded in {self.root}"
            )
            raise UnknownServiceError(
                f"unknown feature service {name!r}: {where} declare(s) "
                f"{', '.join(map(repr, plans)) or 'no FeatureService'}; check the name"
            )
        return plan

    def _current(self) -> dict[str, ServicePlan]:
        plans = self._plans
        if plans is not None and (self.features or time.monotonic() - self._checked < _RECHECK_S):
            return plans
        with self._lock:
            if self.features is not None:
                self._plans = self._plans or load_service_plans(self.features)
                return self._plans
            return self._from_record()

    def _from_record(self) -> dict[str, ServicePlan]:
        found = recorded_module(self.root)
        self._checked = time.monotonic()
        if found is None:
            raise UnknownServiceError(
                f"no feature definitions are recorded in {self.root} (flows.run records them "
                "when it starts); run flows.run with your definitions, or pass "
                "FeatureClient(state_dir, features=FILE)"
            )
        record, module = found
        if self._plans is None or record != self._record:
            self._plans, self._record = load_service_plans(module), record
        return self._plans


def _entity_keys(
    plan: ServicePlan, read: ViewRead, rows: Sequence[Mapping[str, Any]] | pa.Table
) -> list[Any]:
    """Each row's key of the view (a value, or a tuple for a composite key); None when a part
    is null: that row gets the view's empty-window values, as an unknown key does."""
    if isinstance(rows, pa.Table):
        parts = [rows.column(c).to_pylist() for c in read.entity_columns]
    else:
        parts = [[row[c] for row in rows] for c in read.entity_columns]
    if len(parts) == 1:
        return list(parts[0])
    return [None if None in key else key for key in zip(*parts, strict=True)]


_BY_NAME: dict[int, tuple[ViewLayout, dict[str, FeatureDef]]] = {}


def _features_by_name(layout: ViewLayout) -> dict[str, FeatureDef]:
    cached = _BY_NAME.get(id(layout))
    if cached is None or cached[0] is not layout:
        cached = _BY_NAME[id(layout)] = (layout, {f.name: f for f in layout.features})
    return cached[1]


_EMPTY: dict[int, tuple[ViewLayout, dict[str, Any]]] = {}


def _empty_values(layout: ViewLayout) -> dict[str, Any]:
    """The view's empty-window values (what an unknown key reads), computed once per layout."""
    cached = _EMPTY.get(id(layout))
    if cached is None or cached[0] is not layout:
        cached = _EMPTY[id(layout)] = (layout, _evaluate(layout, None, 0, None))
    return cached[1]


def _missing_feature(
    plan: ServicePlan, read: ViewRead, missing: list[str], version: int, layout: ViewLayout
) -> MissingFeatureError:
    return MissingFeatureError(
        f"service {plan.name!r}: feature(s) {missing} of view {read.view!r} are not in its "
        f"live version v{version} (features: {', '.join(f.name for f in layout.features)}); "
        "the view's definition changed under the service: deploy the definitions that "
        "declare them (flows.run / flows.replay), or change the service"
    )


def _evaluate(
    layout: ViewLayout,
    blob: bytes | None,
    t: int,
    as_of: AsOf | None,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    if blob is None:  # an unknown key: the values of empty windows
        blob, as_of = empty_blob(layout), None
    return evaluate_blob(layout, blob, t, as_of, only)
