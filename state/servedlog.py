"""The served-feature log: what a `FeatureClient` served, as Parquet files in the warehouse.

A read hands its result to `ServedLog.view_read` (or `service_read`), which samples it by
`rate` and appends one tuple to an in-memory queue: no copy of the values, no encoding, no
lock on the read's path. A background thread drains the queue every `flush_s` seconds (or
when `flush_rows` rows wait), encodes the values as JSON text and writes one Parquet file per
batch, named by process and sequence so writers never collide:

    <warehouse>/_served/date=2026-11-27/served-<host>-<pid>-<seq>.parquet
        served_at  timestamp[us, UTC]  wall-clock time of the read
        kind       string              "view" | "service"
        name       string              the view or the service
        version    int64               the live version read (null for a service row)
        key        string              the entity key text (a view read; composite keys are
                                       joined as the read client joins them)
        request    string              the request row as JSON (a service read)
        at         timestamp[us, UTC]  the as-of time of the read (now when none was given)
        at_given   bool                the caller gave `at`
        values     string              {feature or column: value} as JSON
    schema metadata: featureflow.served_format = "1"

Memory is bounded: at most `max_reads` reads wait in the queue; reads beyond it are not logged
and are counted in `stats().dropped`. `flows.skew` reads these files back (`read_served`).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import pyarrow as pa

from connectors.objectstore import Store, open_store
from state.codec import key_text
from state.timestamps import to_micros

SERVED_FORMAT = "1"
SERVED_DIR = "_served"
log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("served_at", pa.timestamp("us", tz="UTC")),
        pa.field("kind", pa.string()),
        pa.field("name", pa.string()),
        pa.field("version", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("request", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
        pa.field("at_given", pa.bool_()),
        pa.field("values", pa.string()),
    ],
    metadata={b"featureflow.served_format": SERVED_FORMAT.encode()},
)
_JSON = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_VIEW, _SERVICE = "view", "service"
# One queued read: (kind, name, version, keys or request rows, now µs, `at` as given or None,
# values, wall µs); encoded by the writer thread, never on the read's path.
_Read = tuple[str, str, int | None, Any, int, Any, Sequence[Mapping[str, Any]], int]
_Method = TypeVar("_Method", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class ServedLogStats:
    """Reads logged (queued), dropped when the queue was full, rows and files written."""

    logged: int
    dropped: int
    rows_written: int
    files: int
    errors: int


class ServedLog:
    """Log served feature values to `<warehouse>/_served/` off the read's path.

    Args:
        warehouse: the warehouse root (a directory or an object-store URI).
        rate: the fraction of reads logged (1.0 every read, 0.01 one in a hundred).
        max_reads: reads that may wait in memory; beyond, reads are dropped (counted).
        flush_rows: rows that make the writer write a file before `flush_s` has passed.
        flush_s: the longest a logged read waits before it is written.
        seed: seed of the sampling (reproducible samples in tests).
    """

    def __init__(
        self,
        warehouse: str | Path,
        *,
        rate: float = 1.0,
        max_reads: int = 100_000,
        flush_rows: int = 50_000,
        flush_s: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"ServedLog rate={rate!r} must be a fraction in [0, 1]")
        self.store: Store = open_store(warehouse)
        self.rate = rate
        self.max_reads = max_reads
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self._sample = random.Random(seed).random
        self._queue: collections.deque[_Read] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._started = threading.Lock()
        self._writer: threading.Thread | None = None
        self._seq = itertools.count()
        self._prefix = f"served-{socket.gethostname()}-{os.getpid()}"
        self._logged = self._dropped = self._rows = self._files = self._errors = 0

    # --- the read's path: sample, bound, append ----------------------------------------------

    def view_read(
        self, view: str, version: int | None, keys: Sequence[Any], at: Any, values: Any
    ) -> None:
        """Log one `get` (one key, one dict) or `get_many` result; `at` as the caller gave it."""
        now = time.time_ns() // 1000
        if isinstance(values, dict):  # get: one key, one dict (isinstance of an ABC costs more)
            keys, values = (keys,), (values,)
        self._put((_VIEW, view, version, keys, now, at, values, now))

    def service_read(
        self, service: str, rows: Sequence[Mapping[str, Any]] | pa.Table, at: Any, values: Any
    ) -> None:
        """Log one `get_service_many` result: its request rows and the vectors served."""
        now = time.time_ns() // 1000
        if not isinstance(rows, pa.Table):
            rows = [dict(r) for r in rows]  # the caller may reuse its dicts
        self._put((_SERVICE, service, None, rows, now, at, values, now))

    def _put(self, read: _Read) -> None:
        if self.rate < 1.0 and self._sample() >= self.rate:
            return
        if len(self._queue) >= self.max_reads:
            self._dropped += 1
            return
        self._queue.append(read)
        self._logged += 1
        if self._writer is None:
            self._start()

    # --- the writer thread -----------------------------------------------------------------

    def _start(self) -> None:
        with self._started:
            if self._writer is None and not self._stop.is_set():
                self._writer = threading.Thread(
                    target=self._loop, name="featureflow-served-log", daemon=True
                )
                self._writer.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write every queued read now (the writer thread calls this; so does `close`)."""
        while self._queue:
            batch: list[_Read] = []
            rows = 0
            while self._queue and rows < self.flush_rows:
                read = self._queue.popleft()
                batch.append(read)
                rows += len(read[6])
            self._write(batch)

    def _write(self, batch: list[_Read]) -> None:
        try:
            table = served_table(batch)
            day = datetime.now(UTC).strftime("%Y-%m-%d")
            name = f"{self._prefix}-{next(self._seq):08d}.parquet"
            self.store.write_parquet(f"{SERVED_DIR}/date={day}/{name}", table)
        except Exception as exc:  # a log write must never fail a read; counted, logged
            self._errors += 1
            log.warning("served-feature log: a batch of %d reads is lost (%s)", len(batch), exc)
            return
        self._rows += table.num_rows
        self._files += 1

    def stats(self) -> ServedLogStats:
        return ServedLogStats(self._logged, self._dropped, self._rows, self._files, self._errors)

    def close(self) -> None:
        """Stop the writer and write what is queued. Idempotent."""
        self._stop.set()
        self._wake.set()
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        self.flush()


def served_table(batch: Sequence[_Read]) -> pa.Table:
    """The Parquet rows of queued reads: one row per key (view) or request row (service)."""

    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for kind, name, version, asked, now, at, values, wall in batch:
        items = asked.to_pylist() if isinstance(asked, pa.Table) else asked
        at_us = now if at is None else to_micros(at)
        for item, got in zip(items, values, strict=True):
            cols["served_at"].append(wall)
            cols["kind"].append(kind)
            cols["name"].append(name)
            cols["version"].append(version)
            cols["key"].append(_key(item) if kind == _VIEW else None)
            cols["request"].append(_json(item) if kind == _SERVICE else None)
            cols["at"].append(at_us)
            cols["at_given"].append(at is not None)
            cols["values"].append(_json(got))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _key(key: Any) -> str:
    return key_text(list(key) if isinstance(key, tuple | list) else [key])


def _json(value: Any) -> str:
    return orjson.dumps(value, option=_JSON, default=str).decode()


# --- the read client's hooks -----------------------------------------------------------------


def logs_view_reads(method: _Method) -> _Method:
    """Decorate `FeatureClient.get` / `get_many`: hand each result to the client's
    `served_log` (when it has one) after the read."""

    @functools.wraps(method)
    def logged(client: Any, *args: Any, **kwargs: Any) -> Any:
        out = method(client, *args, **kwargs)
        served: ServedLog | None = client.served_log
        if served is not None:
            if kwargs or len(args) < 2:
                view, keys, at = _call(args, kwargs, ("view", "keys", "at"))
            else:
                view, keys, at = args[0], args[1], args[2] if len(args) > 2 else None
            opened = client._versions.current.get(view)  # the version this read used (or the next)
            served.view_read(view, getattr(opened, "version", None), keys, at, out)
        return out

    return cast(_Method, logged)


def logs_service_reads(method: _Method) -> _Method:
    """Decorate `FeatureClient.get_service_many` like `logs_view_reads`."""

    @functools.wraps(method)
    def logged(client: Any, *args: Any, **kwargs: Any) -> Any:
        out = method(client, *args, **kwargs)
        served: ServedLog | None = client.served_log
        if served is not None:
            name, rows, at = _call(args, kwargs, ("name", "rows", "at"))
            served.service_read(name, rows, at, out)
        return out

    return cast(_Method, logged)


def _call(args: tuple[Any, ...], kwargs: Mapping[str, Any], names: tuple[str, str, str]) -> Any:
    got = list(args) + [None] * (3 - len(args))
    if kwargs:
        aliases = {"key": "keys", "row": "rows"}
        for k, v in kwargs.items():
            got[names.index(aliases.get(k, k))] = v
    return got


def read_served(warehouse: str | Path) -> pa.Table:
    """Every served-feature row logged in the warehouse (an empty table when none)."""
    store = open_store(warehouse)
    names = [
        rel
        for rel in store.tree(SERVED_DIR)
        if rel.endswith(".parquet") and not Path(rel).name.startswith(".")
    ]
    tables = [store.parquet_file(f"{SERVED_DIR}/{rel}").read() for rel in names]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables([t.cast(SCHEMA) for t in tables])
