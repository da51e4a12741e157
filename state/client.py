"""FeatureClient: the embedded read client that serves feature values from the view store.

It runs inside the serving process and opens each view partition as a RocksDB secondary (a
read-only follower, safe while `flows.run` writes). A background thread catches the open
partitions up with the writer every `refresh_s` seconds and follows version switches, so a
read never pays for either. `get` is one RocksDB get of the entity's tile blob plus the merge
of the tiles in each window (`state.read`); `get_many` one multi-get per partition and one
merge of every entity's windows together (`state.batch_read`), equal to `get` key by key. A
read as of a given time takes the partition's newest event times in the same (multi-)get.

This module is the public face and the read itself; what a read stands on has a module each:

    get / get_many / get_service(_many)     FeatureClient (here)
      | key -> key text                     state.request_keys
      | pin the view's open version         state.open_versions (OpenVersions, OpenView: the
      |                                       secondaries, the lease, the reference count)
      | blob(s): one get / multi-get        here
      | tiles -> values                     state.read, state.batch_read
      | a service's plan, its views' columns  state.service_reads, then state.services
      v
    values, handed to the served-feature log when there is one (state.servedlog)

    in the background, a thread a client    state.catch_up (CatchUp: catches every open
                                              version up with its writer; ClientHealth)

Threads: any number of threads may share one client; each read pins the open version it uses,
so neither a version switch nor a catch-up fails a read (`state.open_versions` says how).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import pyarrow as pa

from connectors.partitioner import partition_for, partition_list
from state.batch_read import Checks, empty_blob, evaluate_blobs
from state.catch_up import CatchUp, ClientHealth
from state.codec import (
    ENTITY_PREFIX,
    FOREIGN_WATERMARK,
    WATERMARK,
    decode_int,
    encode_key,
    foreign_key,
)
from state.compiled_read import compiled_answers, compiled_values
from state.errors import RequestTypeError
from state.kernels import kernels
from state.layout import ViewLayout
from state.malloc import tune_allocator
from state.open_versions import OpenVersions, OpenView
from state.read import AsOf, evaluate_blob
from state.request_keys import key_text_of, key_texts
from state.servedlog import ServedLog, logs_service_reads, logs_view_reads
from state.service_reads import ServiceBook, one_row, view_features
from state.services import (
    check_entity_columns,
    on_demand_columns,
    request_columns,
    rows_of,
)
from state.store import ViewStore, list_views
from state.timestamps import Timestamp, to_micros

__all__ = ["ClientHealth", "FeatureClient"]

# Up to this many keys get_many reads key by key (the batch's fixed cost, ~120 us for the
# bench_flow view, is more): 32 when the compiled single read answers the features (3 keys:
# 37 us key by key, 143 us batched; 32 keys: 336 vs 399 us; they cross near 40), else 2.
_SINGLE_READS = 2
_SINGLE_COMPILED_READS = 32


def _single_reads(layout: ViewLayout, compiled: bool, only: frozenset[str] | None = None) -> int:
    if compiled and compiled_answers(layout, only):
        return _SINGLE_COMPILED_READS
    return _SINGLE_READS


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
        compiled: merge counts, sums and means with the compiled kernels (`state.kernels`,
            loaded here: 0.3-0.5 s once per process, about 4 s the first time on a machine;
            no read compiles one later). False for a short-lived client that reads a few
            values: the same values, from the Python merge.

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
        compiled: bool = True,
    ) -> None:
        self.root = Path(state_dir)
        self._store = ViewStore(self.root, create=False)  # checks it is a view store
        tune_allocator()  # reads reuse heap blocks instead of faulting pages in per call
        self._compiled = compiled
        if compiled:
            kernels()  # now, not in the middle of serving (a cold compile takes seconds)
        self._services = ServiceBook(self.root, Path(features) if features else None)
        self.served_log = served_log
        self._versions = OpenVersions(self._store)
        self._catch_up = CatchUp(self._versions, refresh_s)
        self._versions.followed = self._catch_up.start  # on a read's first look at a view

    @property
    def refresh_s(self) -> float:
        """At most this long between catch-ups with the writer (seconds)."""
        return self._catch_up.refresh_s

    def views(self) -> list[str]:
        """The views with a live version."""
        return list_views(self.root)

    def layout(self, view: str) -> ViewLayout:
        opened = self._versions.pin(view)
        try:
            return opened.layout
        finally:
            self._versions.unpin(opened)

    def health(self) -> ClientHealth:
        """How the catch-up thread is doing (last successful round, failures)."""
        return self._catch_up.health()

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
        opened = self._versions.pin(view)
        try:
            layout = opened.layout
            text = key_text_of(view, layout, key)
            blob, newest = self._one_blob(opened, text, at is not None)
            check = AsOf(text, newest) if at is not None else None
            return _evaluate(layout, blob, t, check, self._compiled)
        finally:
            self._versions.unpin(opened)

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
        opened = self._versions.pin(view)
        try:
            texts = key_texts(view, opened.layout, keys)
            if len(texts) <= _single_reads(opened.layout, self._compiled):
                blobs, marks = self._blobs(opened, texts, at is not None)
                layout, strict = opened.layout, at is not None
                return [
                    _evaluate(layout, b, t, AsOf(k, m) if strict else None, self._compiled)
                    for k, b, m in zip(texts, blobs, marks, strict=True)
                ]
            columns = self._read_columns(opened, texts, t, at is not None, None)
        finally:
            self._versions.unpin(opened)
        # one dict per entity (the columns are of one length: no strict zip, 15 us less per 100)
        rows = zip(*columns.values(), strict=False)
        return list(map(dict, map(zip, repeat(list(columns)), rows)))

    def _columns(
        self, view: str, keys: Sequence[Any], at: Timestamp | None, only: frozenset[str]
    ) -> tuple[int, ViewLayout, dict[str, list[Any]]]:
        """The features `only` of `keys` as {feature: values} columns (`get_many`'s read),
        with the version and layout read."""
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        opened = self._versions.pin(view)
        try:
            texts = key_texts(view, opened.layout, keys)
            columns = self._read_columns(opened, texts, t, at is not None, only)
        finally:
            self._versions.unpin(opened)
        return opened.version, opened.layout, columns

    def _one_entity(
        self, view: str, key: str, at: Timestamp | None, only: frozenset[str]
    ) -> tuple[int, ViewLayout, dict[str, Any]]:
        """The features `only` of the entity whose key text is `key`, as {feature: value}
        (`get`'s read), with the version and layout read."""
        t = to_micros(at) if at is not None else time.time_ns() // 1000
        opened = self._versions.pin(view)
        try:
            row = self._read_one(opened, key, t, at is not None, only)
        finally:
            self._versions.unpin(opened)
        return opened.version, opened.layout, row

    def _read_one(
        self, opened: OpenView, text: str, t: int, strict: bool, only: frozenset[str] | None
    ) -> dict[str, Any]:
        """{feature: value} of the key `text`: one point get and one merge."""
        blob, newest = self._one_blob(opened, text, strict)
        check = AsOf(text, newest) if strict else None
        return _evaluate(opened.layout, blob, t, check, self._compiled, only)

    def _read_columns(
        self, opened: OpenView, texts: list[str], t: int, strict: bool, only: frozenset[str] | None
    ) -> dict[str, list[Any]]:
        """{feature: values} of the keys `texts`; each distinct key is read and merged once."""
        layout = opened.layout
        if len(texts) == 1:  # one request: `get`'s read
            row = self._read_one(opened, texts[0], t, strict, only)
            return {name: [value] for name, value in row.items()}
        distinct = list(dict.fromkeys(texts))
        blobs, marks = self._blobs(opened, distinct, strict)
        if len(distinct) > _single_reads(layout, self._compiled, only):
            checks = Checks(distinct, marks) if strict else None
            columns = evaluate_blobs(layout, blobs, t, checks, only, compiled=self._compiled)
        else:
            rows = [
                _evaluate(layout, b, t, AsOf(k, m) if strict else None, self._compiled, only)
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
        self, opened: OpenView, text: str, strict: bool
    ) -> tuple[bytes | None, int | None]:
        """One key's blob (a point get) and, when `strict`, its partition's newest event time
        (see `_blobs`; noted per catch-up round, so most strict reads are one point get too)."""
        partition = partition_for(text, opened.layout.partitions)
        db = opened.dbs.get(partition) or self._versions.open_partition(opened, partition)
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
        self, opened: OpenView, keys: list[str], strict: bool
    ) -> tuple[list[bytes | None], list[int | None]]:
        """Each key's blob (one multi-get per partition) and, when `strict`, its partition's
        newest event time, read in the same multi-get (one consistent view of the partition,
        so never older than what pruned the blobs)."""
        parts = opened.layout.partitions
        by_partition: dict[int, list[int]] = {}
        for i, partition in enumerate(partition_list(keys, parts)):
            by_partition.setdefault(partition, []).append(i)
        blobs: list[bytes | None] = [None] * len(keys)
        marks: list[int | None] = [None] * len(keys)
        for partition, positions in by_partition.items():
            db = opened.dbs.get(partition) or self._versions.open_partition(opened, partition)
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
        if type(row) is not dict and not isinstance(row, Mapping):
            raise RequestTypeError(
                f"service {name!r}: get_service takes one row as a dict, got a "
                f"{type(row).__name__}; for many rows use get_service_many"
            )
        out = one_row(self._services.plan(name), row, at, self._one_entity)
        if out is None:  # a row the batch path reads, or names what is wrong in
            return self.get_service_many(name, [row], at)[0]
        if self.served_log is not None:
            self.served_log.service_read(name, [row], at, [out])
        return out

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
        inputs: dict[str, pa.Array] = request_columns(plan, rows)
        values: dict[str, list[Any]] = {}
        for read in plan.reads:
            found, arrays = view_features(plan, read, rows, at, self._columns)
            values.update(found)
            inputs.update(arrays)
        outputs = on_demand_columns(plan, inputs, n)
        columns = {c: values[c] if c in values else outputs[c].to_pylist() for c in plan.columns}
        return rows_of(columns, n)

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every open view; later calls raise ClientClosedError. Idempotent."""
        self._catch_up.stop()
        self._versions.close()
        if self.served_log is not None:
            self.served_log.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if sys.is_finalizing():
            # The interpreter is exiting: its daemon threads (this client's catch-up thread)
            # are frozen wherever they were, perhaps holding the locks `close` takes, which
            # hung the exit. The process's end releases the handles, leases and files.
            return
        with contextlib.suppress(Exception):
            self.close()


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


def _evaluate(
    layout: ViewLayout,
    blob: bytes | None,
    t: int,
    as_of: AsOf | None,
    compiled: bool = True,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    if blob is None:  # an unknown key: the values of empty windows
        blob, as_of = empty_blob(layout), None
    found = compiled_values(layout, blob, t, as_of, only) if compiled else None
    return found if found is not None else evaluate_blob(layout, blob, t, as_of, only)
